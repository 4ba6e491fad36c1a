"""`make test-integrations`: each trainer's own 3-step SFT with its DFT flag against its adapter.

Not collected by pytest (the trainers pin different transformers; they cannot share the test
venv). For each trainer: one venv (torch 2.13.0 kept, the trainer pinned in TRAINERS, fused_dft
installed editable without deps), then, inside it, this script with `--inside TRAINER`: a tiny
config-built Qwen2 and a word-level tokenizer written to a temporary folder (nothing from a hub),
the trainer's own SFT for 3 optimizer steps with its flag (its own loss), the same run through the
adapter, and the logged losses and grad norms compared (rtol LOSS_RTOL). verl has no DFT flag:
its SFT trainer with its loss function's DFT form written here, on RANKS["verl"] torchrun
ranks, against the adapter (the CPU shim it needs: verl_cpu.py). Prints one line per step
and a summary; exits 1 if any trainer differs or fails. The results of a full run are recorded in
docs/integrations.md.

    python tests/integrations/run_trainers.py [--trainers llamafactory ...] [--venvs DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TORCH = "torch==2.13.0"
LIGER = "axolotl.integrations.liger.LigerPlugin"
PLUGIN = "fused_dft.integrations.axolotl.FusedDFTPlugin"
# axolotl's DFT: Liger's fused linear cross-entropy with token scaling
LIGER_DFT_KEYS = {
    "plugins": [LIGER],
    "liger_fused_linear_cross_entropy": True,
    "liger_use_token_scaling": True,
}
# trainer -> (pip requirement, the cases run: (name, the trainer's own flags))
TRAINERS = {
    "llamafactory": (
        "llamafactory==0.9.5",
        [
            ("dft", {"use_dft_loss": True}),
            ("eaft", {"use_eaft_loss": True, "eaft_alpha": 0.7}),
            # the reference: the starting model loaded again (LLaMA-Factory's default); the KL
            # and its gradient are 0 at step 1 and grow as the policy moves
            ("asft", {"use_asft_loss": True, "asft_alpha": 0.5}),
            # ref_model: another tiny Qwen2 (REF_MODEL: written beside the model), so the KL is
            # large from step 1
            (
                "asft_ref_model",
                {"use_asft_loss": True, "asft_alpha": 0.5, "ref_model": "REF_MODEL"},
            ),
            ("ce", {}),
        ],
    ),
    "ms-swift": ("ms-swift==4.6.0", [("dft", {"enable_dft_loss": True}), ("ce", {})]),
    # verl has no DFT flag: its own SFT with its loss function swapped for DFT on its own
    # log-probs (from the logits), against the adapter's (fused log-probs, no logits)
    "verl": (
        "verl==0.9.1",
        [
            ("dft", {"loss_type": "dft"}),  # impl auto: chunked_torch on the CPU
            ("dft-fused", {"loss_type": "dft", "impl": "fused"}),  # Triton's interpreter
            ("ce", {"loss_type": "ce"}),
            # a tied head: FSDP2 leaves it to the root unit (not its own unit)
            ("dft-tied", {"loss_type": "dft", "tie": True}),
        ],
    ),
    "axolotl": (
        "axolotl==0.19.0",
        [
            ("dft", LIGER_DFT_KEYS),
            ("eaft", {"use_eaft": True, "eaft_alpha": 0.7}),
            ("ce", {}),
            # LoRA on every linear layer but the head; axolotl's LoRA kernels are CUDA-only
            (
                "dft_lora",
                {
                    **LIGER_DFT_KEYS,
                    "adapter": "lora",
                    "lora_r": 4,
                    "lora_alpha": 8,
                    "lora_dropout": 0.0,
                    "lora_target_linear": True,
                    "lora_mlp_kernel": False,
                    "lora_qkv_kernel": False,
                    "lora_o_kernel": False,
                },
            ),
        ],
    ),
}
# the CUDA-only wheels a trainer pulls from PyPI that cannot load beside torch's CPU build
# (torchaudio / torchvision 0.28: "libc10_cuda.so: cannot open shared object file"): removed from
# the venv; a trainer that imports one unconditionally gets an empty stand-in module (SHIMS)
CUDA_ONLY = {"llamafactory": ["torchvision", "torchaudio"]}
SHIMS = {"llamafactory": ["torchaudio"]}  # llamafactory.data.mm_plugin: `import torchaudio`
# trainers run on several CPU ranks through torchrun (gloo): verl's FSDP2 then shards every
# parameter, the untied lm_head as its own unit
RANKS = {"verl": 2}
# what a trainer imports but does not declare (verl 0.9.1: `import uvicorn` in
# verl/workers/rollout/utils.py, reached from its SFT trainer), and triton for impl="fused"
EXTRAS = {"verl": ["uvicorn", "fastapi", "triton==3.9.0"]}
# environment of the runs inside a trainer's venv (no network: axolotl's telemetry off)
ENV = {"axolotl": {"AXOLOTL_DO_NOT_TRACK": "1"}}
LOSS_RTOL = 1e-5
V = 64  # >= 20: LLaMA-Factory's EAFT takes the top 20 logits


def build_venv(trainer: str, venvs: Path) -> tuple[Path, dict]:
    venv = venvs / trainer
    python = venv / "bin" / "python"
    facts: dict = {"venv": str(venv)}
    if not python.exists():
        start = time.time()
        wheels = ["--find-links", "/opt/wheels"] if Path("/opt/wheels").is_dir() else []
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", *wheels]
        subprocess.run([*pip, TORCH], check=True)
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
            constraints.write(TORCH + "\n")
        requirements = [TRAINERS[trainer][0], *EXTRAS.get(trainer, [])]
        subprocess.run([*pip, "-c", constraints.name, *requirements], check=True)
        facts["install_s"] = round(time.time() - start)
        for name in CUDA_ONLY.get(trainer, []):
            subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", name], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)])
    size = subprocess.run(["du", "-sm", str(venv)], capture_output=True, text=True).stdout
    facts["size_mb"] = int(size.split()[0])
    return python, facts


# --- inside a trainer's venv ---------------------------------------------------------------------


def tiny_model_dir(
    folder: Path, byte_level: bool = False, seed: int = 0, fit_loaded: bool = False
) -> Path:
    """A 2-layer Qwen2 from its config and a tokenizer: word-level over 't3'..'t63', or
    (byte_level) a byte-level BPE trained on the sentences, which transformers >= 5.19 keeps when
    it rebuilds a Qwen2Tokenizer from the saved vocabulary (a word-level one then encodes to []).
    seed: the weights' (another seed: another model over the same tokenizer, in its own folder).
    fit_loaded: the vocabulary sized to the tokenizer as AutoTokenizer loads it back (a rebuilt
    Qwen2Tokenizer adds '<|endoftext|>'); axolotl would otherwise resize the embeddings at load
    and draw the new rows from torch's RNG before any seed is set: a different model each run."""
    import tokenizers
    import torch
    import transformers

    specials = ["<pad>", "<s>", "</s>"]
    if byte_level:
        backend = tokenizers.Tokenizer(tokenizers.models.BPE())
        backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=320, special_tokens=specials,
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        )  # fmt: skip
        backend.train_from_iterator([" ".join(w) for w in sentences(200, seed=1)], trainer)
    else:
        vocab = {**{t: i for i, t in enumerate(specials)}, **{f"t{i}": i for i in range(3, V)}}
        backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
        backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    path = folder / ("tiny-qwen2" if seed == 0 else f"tiny-qwen2-seed{seed}")
    vocab = backend.get_vocab_size()
    if fit_loaded:
        tok.save_pretrained(path)
        transformers.Qwen2Config(vocab_size=vocab).save_pretrained(path)
        tok = transformers.AutoTokenizer.from_pretrained(path)
        vocab = len(tok)
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )  # fmt: skip
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def sentences(n: int = 32, seed: int = 20) -> list[list[str]]:
    """Word sequences with a learnable rule (each token the previous one + 3), ragged lengths."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start, length = rng.randrange(3, V - 3), rng.randrange(6, 14)
        rows.append([f"t{3 + (start + 3 * i) % (V - 3)}" for i in range(length)])
    return rows


def run_llamafactory(folder: Path) -> list[dict]:
    import importlib.metadata

    from llamafactory.train.tuner import run_exp as stock_run_exp

    from fused_dft.integrations.llamafactory import run_exp

    model = tiny_model_dir(folder)
    ref_model = str(tiny_model_dir(folder, seed=1))
    data = folder / "data"
    data.mkdir()
    halves = [(w[: len(w) // 2], w[len(w) // 2 :]) for w in sentences()]
    rows = [{"instruction": " ".join(a), "input": "", "output": " ".join(b)} for a, b in halves]
    (data / "tiny.json").write_text(json.dumps(rows))
    (data / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "tiny.json"}}))
    results = []
    for case, flags in TRAINERS["llamafactory"][1]:
        flags = {k: ref_model if v == "REF_MODEL" else v for k, v in flags.items()}
        logs = {}
        for who, run in (("llamafactory", stock_run_exp), ("fused_dft", run_exp)):
            out = folder / f"{case}-{who}"
            args = {
                "model_name_or_path": str(model), "stage": "sft", "do_train": True,
                "finetuning_type": "full", "dataset": "tiny", "dataset_dir": str(data),
                "template": "empty", "cutoff_len": 32, "output_dir": str(out),
                "overwrite_cache": True, "per_device_train_batch_size": 4,
                "gradient_accumulation_steps": 2, "max_steps": 3, "learning_rate": 0.5,
                "optim": "sgd", "lr_scheduler_type": "constant", "logging_steps": 1,
                "report_to": "none", "save_strategy": "no", "seed": 0, "bf16": False,
                "use_cpu": True, "dataloader_num_workers": 0, **flags,
            }  # fmt: skip
            seen = PatchSeen()
            run(args, callbacks=[seen])
            if seen.patched != (who == "fused_dft"):
                raise AssertionError(f"{case} {who}: model patched = {seen.patched}")
            state = json.loads((out / "trainer_state.json").read_text())
            logs[who] = [h for h in state["log_history"] if "loss" in h]
        results.append(compare("llamafactory", case, logs["llamafactory"], logs["fused_dft"]))
    for r in results:
        r["version"] = importlib.metadata.version("llamafactory")
    return results


class PatchSeen:
    """A TrainerCallback (duck-typed) that records whether the trained model is patched."""

    patched = None

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        import fused_dft

        self.patched = fused_dft.is_patched(model)


def run_ms_swift(folder: Path) -> list[dict]:
    import importlib.metadata

    from swift.arguments import SftArguments
    from swift.pipelines.train.sft import SwiftSft

    import fused_dft
    from fused_dft.integrations import ms_swift

    model = tiny_model_dir(folder, byte_level=True)
    data = folder / "tiny.jsonl"
    chats = [
        {"messages": [
            {"role": "user", "content": " ".join(w[: len(w) // 2])},
            {"role": "assistant", "content": " ".join(w[len(w) // 2 :])},
        ]}
        for w in sentences()
    ]  # fmt: skip
    data.write_text("\n".join(json.dumps(c) for c in chats))
    results = []
    for case, flags in TRAINERS["ms-swift"][1]:
        logs = {}
        for who in ("ms-swift", "fused_dft"):
            plugin = {"external_plugins": [ms_swift.__file__], "tuner_type": "fused_dft"}
            args = SftArguments(
                model=str(model), model_type="qwen2", template="qwen", dataset=[str(data)],
                max_length=256, output_dir=str(folder / f"{case}-{who}"), add_version=False,
                per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=3,
                learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", warmup_ratio=0.0,
                logging_steps=1, report_to=["none"], save_strategy="no", seed=0, data_seed=0,
                torch_dtype="float32", bf16=False, fp16=False, use_cpu=True,
                dataloader_num_workers=0, split_dataset_ratio=0, dataset_num_proc=1,
                **(plugin if who == "fused_dft" else {"tuner_type": "full"}), **flags,
            )  # fmt: skip
            sft = SwiftSft(args)
            state = sft.main()
            patched = fused_dft.is_patched(sft.model)
            if patched != (who == "fused_dft"):
                raise AssertionError(f"{case} {who}: model patched = {patched}")
            logs[who] = [h for h in state["log_history"] if "loss" in h]
        results.append(compare("ms-swift", case, logs["ms-swift"], logs["fused_dft"]))
    for r in results:
        r["version"] = importlib.metadata.version("ms-swift")
    return results


def run_axolotl(folder: Path) -> list[dict]:
    """axolotl's own SFT (`axolotl train`'s steps: load_cfg, load_datasets, train) with its loss
    keys, and with the plugin added; each run in a process of its own (axolotl's PluginManager
    is a singleton, and Liger patches the Qwen2 classes)."""
    import importlib.metadata

    model = tiny_model_dir(folder, byte_level=True, fit_loaded=True)
    data = folder / "tiny.jsonl"
    halves = [(w[: len(w) // 2], w[len(w) // 2 :]) for w in sentences()]
    rows = [{"instruction": " ".join(a), "input": "", "output": " ".join(b)} for a, b in halves]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    results = []
    for case, flags in TRAINERS["axolotl"][1]:
        logs = {}
        for who in ("axolotl", "fused_dft"):
            out = folder / f"{case}-{who}"
            plugins = flags.get("plugins", []) + ([PLUGIN] if who == "fused_dft" else [])
            cfg = {
                "base_model": str(model), "datasets": [{"path": str(data), "ds_type": "json",
                "type": "alpaca"}], "dataset_prepared_path": str(out / "prepared"),
                "val_set_size": 0, "sequence_len": 256, "micro_batch_size": 4,
                "gradient_accumulation_steps": 2, "max_steps": 3, "optimizer": "sgd",
                "learning_rate": 0.5, "lr_scheduler": "constant", "warmup_steps": 0,
                "logging_steps": 1, "output_dir": str(out), "bf16": False, "fp16": False,
                "tf32": False, "save_strategy": "no", "seed": 0, "dataloader_num_workers": 0,
                "dataset_processes": 1, **flags, "plugins": plugins,
            }  # fmt: skip
            out.mkdir()
            (out / "config.yaml").write_text(json.dumps(cfg))  # JSON is YAML
            cmd = [sys.executable, __file__, "--axolotl-run", str(out / "config.yaml")]
            subprocess.run([*cmd, "--out", str(out / "result.json")], check=True)
            result = json.loads((out / "result.json").read_text())
            if result["patched"] != (who == "fused_dft"):
                raise AssertionError(f"{case} {who}: model patched = {result['patched']}")
            logs[who] = result["logs"]
        results.append(compare("axolotl", case, logs["axolotl"], logs["fused_dft"]))
    for r in results:
        r["version"] = importlib.metadata.version("axolotl")
    return results


def axolotl_run(config: str, out: str) -> None:
    """One `axolotl train config.yaml`, its logged steps and whether it trained a patched model."""
    import transformers
    from axolotl.cli.args import TrainerCliArgs
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from axolotl.train import train

    import fused_dft

    cfg = load_cfg(config)
    meta = load_datasets(cfg=cfg, cli_args=TrainerCliArgs())
    # axolotl creates a LoRA adapter (lora_A drawn from torch's RNG) before HF Trainer seeds:
    # seeded here (a test shim, not in the plugin), so that both runs start from the same one
    transformers.set_seed(cfg.seed)
    model, _, trainer = train(cfg=cfg, dataset_meta=meta)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    Path(out).write_text(json.dumps({"patched": fused_dft.is_patched(model), "logs": logs}))


def compare(trainer: str, case: str, theirs: list[dict], ours: list[dict]) -> dict:
    rows, ok = [], len(theirs) == len(ours) == 3
    for step, (a, b) in enumerate(zip(theirs, ours), 1):
        row = {"step": step}
        for key in ("loss", "grad_norm"):
            x, y = float(a[key]), float(b[key])
            row[key] = (x, y)
            ok &= abs(x - y) <= LOSS_RTOL * abs(x) + 1e-7
        rows.append(row)
    return {"trainer": trainer, "case": case, "equal": bool(ok), "steps": rows}


def run_verl(folder: Path) -> list[dict]:
    """verl's SFT trainer (its FSDP engine, gloo, one CPU rank) for 3 steps: its own log-probs
    (logits -> log_softmax -> gather) with its own SFT loss ("ce") or that loss's DFT form
    written here ("dft"), against fused_dft.integrations.verl.SFTTrainer."""
    import importlib.metadata
    from functools import partial

    import pandas
    import torch
    import transformers
    import verl_cpu  # tests/integrations: verl's CPU platform and engine registration
    from hydra import compose, initialize_config_module

    verl_cpu.install()
    import verl.trainer.sft_trainer as verl_sft
    from verl.utils.torch_functional import masked_sum
    from verl.workers.utils.losses import sft_loss

    from fused_dft.integrations import verl as adapter
    from fused_dft.integrations import verl_logprobs

    def own_dft_loss(model_output, data, dp_group=None, config=None):
        """verl's sft_loss (no-padding branch) with -sg(p) log p per token in place of -log p."""
        log_prob = model_output["log_probs"].values()
        mask = torch.roll(data["loss_mask"].values(), shifts=-1, dims=0)
        per_token = -torch.exp(log_prob.detach()) * log_prob
        return masked_sum(per_token, mask) / data["batch_num_tokens"] * data["dp_size"], {}

    class OwnLoss(verl_sft.SFTTrainer):
        """verl's trainer, unchanged but for the loss function (DFT) set after its engine."""

        def _build_engine(self):
            super()._build_engine()
            own = self.loss_type == "dft"
            self.loss_fn = own_dft_loss if own else partial(sft_loss, config=None)
            self.training_client.set_loss_fn(loss_fn=self.loss_fn)

    class Recorder:
        """Stands in for verl's Tracking (sft_trainer.Tracking): keeps each step's metrics."""

        logs: list[dict] = []

        def __init__(self, *args, **kwargs):
            Recorder.logs = []

        def log(self, data, step):
            Recorder.logs.append({"loss": data["train/loss"], "grad_norm": data["train/grad_norm"]})

    verl_sft.Tracking = Recorder
    model = tiny_model_dir(folder, byte_level=True)  # transformers 5.10 rebuilds a Qwen2Tokenizer
    tok = transformers.AutoTokenizer.from_pretrained(model)
    # special tokens around each turn: per-turn and whole-chat tokenization agree (verl checks)
    tok.chat_template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    tok.save_pretrained(model)
    tied = folder / "tiny-qwen2-tied"
    config = transformers.AutoConfig.from_pretrained(model)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(tied)
    tok.save_pretrained(tied)
    halves = [(w[: len(w) // 2], w[len(w) // 2 :]) for w in sentences()]
    chats = [
        [{"role": "user", "content": " ".join(a)}, {"role": "assistant", "content": " ".join(b)}]
        for a, b in halves
    ]
    pandas.DataFrame({"messages": chats}).to_parquet(folder / "tiny.parquet")
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", LOCAL_RANK="0",
                           WORLD_SIZE="1").items():  # fmt: skip
        os.environ.setdefault(key, value)  # torchrun sets them for several ranks
    torch.distributed.init_process_group("gloo")
    results = []
    for case, flags in TRAINERS["verl"][1]:
        logs = {}
        ours = {k: v for k, v in flags.items() if k in ("loss_type", "impl")}
        for who in ("verl", "fused_dft"):
            overrides = [
                f"model.path={tied if flags.get('tie') else model}",
                "model.use_remove_padding=false",
                "model.enable_gradient_checkpointing=false",
                "+model.override_config.attn_implementation=sdpa",
                f"data.train_files={folder / 'tiny.parquet'}", "data.train_batch_size=8",
                "data.micro_batch_size_per_gpu=2", "data.use_dynamic_bsz=false",
                "data.max_length=64", "data.num_workers=0", "engine.strategy=fsdp2",
                "engine.model_dtype=fp32", "engine.dtype=float32",
                "+engine.mixed_precision={param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}",
                "engine.use_torch_compile=false",
                "optim.lr=0.01", "optim.weight_decay=0.0", "trainer.total_training_steps=3",
                "trainer.logger=[console]", "trainer.device=cpu", "trainer.resume_mode=disable",
                f"trainer.default_local_dir={folder / f'{case}-{who}'}",
                "checkpoint.save_contents=[model]",
            ]  # fmt: skip
            with initialize_config_module("verl.trainer.config", version_base=None):
                config = compose("sft_trainer_engine", overrides)
            torch.manual_seed(0)
            if who == "verl":
                OwnLoss.loss_type = flags["loss_type"]
                trainer = OwnLoss(config)
            else:
                trainer = adapter.SFTTrainer(config, **ours)
            forward = trainer.engine.module.__dict__.get("forward")
            patched = getattr(forward, "__func__", None) is verl_logprobs.fused_logprob_forward
            if patched != (who == "fused_dft"):
                raise AssertionError(f"{case} {who}: model patched = {patched}")
            trainer.fit()
            logs[who] = list(Recorder.logs)
        results.append(compare("verl", case, logs["verl"], logs["fused_dft"]))
    torch.distributed.destroy_process_group()
    for r in results:
        r["version"] = importlib.metadata.version("verl")
    return results


INSIDE = {
    "llamafactory": run_llamafactory,
    "ms-swift": run_ms_swift,
    "verl": run_verl,
    "axolotl": run_axolotl,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainers", nargs="*", default=list(TRAINERS))
    parser.add_argument("--venvs", default=os.environ.get("FUSED_DFT_VENVS", ROOT / ".venvs"))
    parser.add_argument("--inside", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--axolotl-run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.axolotl_run:
        axolotl_run(args.axolotl_run, args.out)
        return 0
    if args.inside:
        with tempfile.TemporaryDirectory() as folder:
            results = INSIDE[args.inside](Path(folder))
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 logs the metrics
            Path(args.out).write_text(json.dumps(results))
        return 0
    failed = False
    for trainer in args.trainers:
        python, facts = build_venv(trainer, Path(args.venvs))
        print(f"== {trainer} ({TRAINERS[trainer][0]}): {facts}", flush=True)
        out = Path(tempfile.mkdtemp()) / "results.json"
        with tempfile.TemporaryDirectory() as shims:
            for name in SHIMS.get(trainer, []):
                (Path(shims) / f"{name}.py").write_text('"""stand-in: not loadable on CPU"""\n')
            path = os.pathsep.join([shims, str(ROOT)])
            env = {
                **os.environ,
                "PYTHONPATH": path,
                "TRITON_INTERPRET": "1",
                **ENV.get(trainer, {}),
            }
            launch = [str(python)]
            if RANKS.get(trainer, 1) > 1:
                launch += ["-m", "torch.distributed.run", f"--nproc-per-node={RANKS[trainer]}"]
            cmd = [*launch, __file__, "--inside", trainer, "--out", str(out)]
            if subprocess.run(cmd, env=env).returncode != 0:
                print(f"!! {trainer}: the run failed", flush=True)
                failed = True
                continue
            for result in json.loads(out.read_text()):
                print(f"{trainer} {result['case']}: equal={result['equal']}")
                for row in result["steps"]:
                    print(f"  step {row['step']}: loss {row['loss']}, grad_norm {row['grad_norm']}")
                failed |= not result["equal"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
