"""Fine-tune a causal LM with Dynamic Fine-Tuning (DFT) through fused_dft.patch_model.

By default everything is local and quick (well under a minute on a CPU): a tiny Llama built from a
config, a byte-level tokenizer and a small built-in prompt/completion dataset.

    python examples/train_dft.py
    python examples/train_dft.py --model path/to/local/model --data train.jsonl --device cuda \\
        --steps 200 --lr 1e-5 --dtype bfloat16

JSONL rows are {"prompt": ..., "completion": ...} (loss on the completion only) or {"text": ...}.
Nothing is downloaded: --model must be a local directory.

DFT's loss, -p * log p per token, is 10-20x smaller than cross-entropy and can rise while the
model learns (it grows with p while p < 1/e), so the CE of the same pass is printed next to it.
DFT is meant for fine-tuning a pretrained model: from the random init of the default tiny model it
learns the tokens it already finds likely and leaves the unlikely ones behind (compare with
--loss-type ce).
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

import fused_dft

BUILTIN = [
    ("What is the capital of France?", "Paris."),
    ("What is the capital of Italy?", "Rome."),
    ("What is the capital of Japan?", "Tokyo."),
    ("What is the capital of Spain?", "Madrid."),
    ("What is 2 + 2?", "4."),
    ("What is 3 + 5?", "8."),
    ("What is 7 - 4?", "3."),
    ("What is 6 * 2?", "12."),
    ("Spell 'cat' backwards.", "tac."),
    ("Spell 'dog' backwards.", "god."),
    ("Name a primary color.", "Red."),
    ("What do bees make?", "Honey."),
    ("What colour is the sky on a clear day?", "Blue."),
    ("How many legs does a spider have?", "Eight."),
    ("What is frozen water called?", "Ice."),
    ("Which planet is closest to the sun?", "Mercury."),
]


class ByteTokenizer:
    """UTF-8 bytes shifted past three special ids (pad 0, bos 1, eos 2): no vocabulary file."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    vocab_size = 256 + 3

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


def load_model_and_tokenizer(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    if args.model is None:
        tokenizer = ByteTokenizer()
        config = LlamaConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
        torch.manual_seed(args.seed)
        return AutoModelForCausalLM.from_config(config), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        args.model, local_files_only=True, dtype=getattr(torch, args.dtype)
    )
    return model, tokenizer


def load_examples(path):
    if path is None:
        return [{"prompt": p + "\n", "completion": c} for p, c in BUILTIN]
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def tokenize(example, tokenizer, max_length):
    """input_ids and labels (-100 on the prompt: only the completion is trained on)."""
    if "text" in example:
        prompt, completion = [], tokenizer.encode(example["text"], add_special_tokens=False)
    else:
        prompt = tokenizer.encode(example["prompt"], add_special_tokens=False)
        completion = tokenizer.encode(example["completion"], add_special_tokens=False)
    prompt = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + prompt
    completion = completion + [tokenizer.eos_token_id]
    ids = (prompt + completion)[:max_length]
    labels = ([-100] * len(prompt) + completion)[:max_length]
    return ids, labels


def collate(rows, pad_id, device):
    length = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), length), pad_id)
    labels = torch.full((len(rows), length), -100)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
        mask[i, : len(row_ids)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}, labels.to(device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="local model directory (default: a tiny Llama)")
    parser.add_argument("--data", help="JSONL file (default: a small built-in dataset)")
    parser.add_argument("--loss-type", default="dft", choices=["dft", "ce"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", help="weights dtype for --model")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", help="directory to save the fine-tuned model to")
    args = parser.parse_args(argv)

    model, tokenizer = load_model_and_tokenizer(args)
    model.to(args.device).train()
    # The one line: from here on, a forward with labels returns the fused loss and no logits.
    fused_dft.patch_model(model, loss_type=args.loss_type)

    rows = [tokenize(ex, tokenizer, args.max_length) for ex in load_examples(args.data)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    rng = random.Random(args.seed)
    order: list[int] = []
    size = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{type(model).__name__} ({size:.2f}M parameters), {len(rows)} examples, "
          f"loss_type={args.loss_type}, device={args.device}")  # fmt: skip

    start, tokens = time.perf_counter(), 0
    for step in range(1, args.steps + 1):
        micro = []
        for _ in range(args.grad_accum):
            if len(order) < args.batch_size:
                order += rng.sample(range(len(rows)), len(rows))
            batch, order = order[: args.batch_size], order[args.batch_size :]
            micro.append(collate([rows[i] for i in batch], tokenizer.pad_token_id, args.device))
        # gradient accumulation as HF Trainer does it: each micro-batch's loss is its sum over
        # tokens divided by the token count of the whole step (num_items_in_batch)
        num_items = sum(int((labels[:, 1:] != -100).sum()) for _, labels in micro)
        loss = ce = acc = 0.0
        for inputs, labels in micro:
            out = model(**inputs, labels=labels, num_items_in_batch=num_items)
            out.loss.backward()
            share = float(out.num_tokens) / num_items
            loss += float(out.loss.detach())
            ce += share * float(out.ce_loss)
            acc += share * float(out.token_accuracy)
            tokens += int(inputs["attention_mask"].sum())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step == 1:
            rate = tokens / (time.perf_counter() - start)
            print(f"step {step:4d}  loss ({args.loss_type}) {loss:.4f}  ce {ce:.4f}  "
                  f"token_acc {acc:.3f}  {rate:,.0f} tok/s")  # fmt: skip

    # Evaluation with labels returns the fused loss and the logits (for metrics); generation
    # runs the stock forward.
    model.eval()
    with torch.no_grad():
        inputs, labels = collate(rows[: args.batch_size], tokenizer.pad_token_id, args.device)
        out = model(**inputs, labels=labels)
        print(f"eval: loss ({args.loss_type}) {float(out.loss):.4f}  ce {float(out.ce_loss):.4f}  "
              f"logits {tuple(out.logits.shape)}")  # fmt: skip
        example = load_examples(args.data)[0]
        prompt = example.get("prompt", example.get("text", "")[:20])
        ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        ids = torch.tensor([ids + tokenizer.encode(prompt, add_special_tokens=False)])
        generated = model.generate(
            ids.to(args.device), max_new_tokens=12, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        print(f"sample: {prompt!r} -> {tokenizer.decode(generated[0, ids.shape[1] :].tolist())!r}")

    fused_dft.unpatch_model(model)  # the stock model again, e.g. before handing it on
    if args.save:
        model.save_pretrained(args.save)
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(args.save)
        print(f"saved to {args.save}")


if __name__ == "__main__":
    main()
