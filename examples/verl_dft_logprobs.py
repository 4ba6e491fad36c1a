"""A verl-style SFT step with its loss swapped for DFT, built on fused_linear_logprobs.

RL-style trainers (verl's SFT and PPO / GRPO losses) take per-token log p_y (and the entropy) from
the model and build the loss themselves. fused_linear_logprobs returns both from the last hidden
state and the LM head's weight, without the logits and with gradients through both, so the
trainer's own loss runs on them unchanged. Here verl's SFT loss (masked mean of -log p_y) becomes
DFT's, -sg(p_y) log p_y, plus an entropy bonus as a PPO actor would add.

    python examples/verl_dft_logprobs.py          # a tiny random model on the CPU, a few seconds
"""

from __future__ import annotations

import torch

import fused_dft


def dft_sft_loss(log_prob: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """verl's SFT loss is -(log_prob * loss_mask).sum() / loss_mask.sum(); DFT weights each
    token by its own (gradient-stopped) probability."""
    per_token = -log_prob.detach().exp() * log_prob
    return (per_token * loss_mask).sum() / loss_mask.sum().clamp(min=1)


def main() -> None:
    torch.manual_seed(0)
    vocab, dim, batch, seq = 1000, 64, 4, 32
    body = torch.nn.Sequential(torch.nn.Embedding(vocab, dim), torch.nn.Linear(dim, dim),
                               torch.nn.Tanh())  # fmt: skip
    lm_head = torch.nn.Linear(dim, vocab, bias=False)
    params = [*body.parameters(), *lm_head.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-2)
    input_ids = torch.randint(0, vocab, (batch, seq))
    loss_mask = (torch.rand(batch, seq - 1) > 0.2).float()  # e.g. the response tokens only
    temperature, entropy_coeff = 1.0, 1e-3
    for step in range(5):
        hidden = body(input_ids)[:, :-1]  # the last hidden state, shifted like the labels
        labels = input_ids[:, 1:]
        log_prob, entropy = fused_dft.fused_linear_logprobs(
            hidden, lm_head.weight, labels, logit_scale=1.0 / temperature
        )
        loss = dft_sft_loss(log_prob, loss_mask)
        loss = loss - entropy_coeff * (entropy * loss_mask).sum() / loss_mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        mean_entropy = float((entropy.detach() * loss_mask).sum() / loss_mask.sum())
        # DFT's loss -p log p grows with p while p < 1/e: from a random model it rises at first
        print(f"step {step}: dft loss {float(loss.detach()):.4f}  mean entropy {mean_entropy:.3f}")


if __name__ == "__main__":
    main()
