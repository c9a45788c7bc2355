"""Distillation of a tiny random transformer encoder into a shallower one (KL to the frozen teacher's logits),
run by tests/test_trainer.py twice: under torchrun with 2 CPU processes (gloo) and in the test's own process,
to check that data-parallel training ends with the weights of single-process training on the same global
batches. Plain torch modules: each torchrun process then skips importing transformers (several seconds).

Usage: python tests/ddp_worker.py OUT.pt CHECKPOINT_DIR   (rank 0 writes the student's final state_dict)
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from compress.distill.teacher import prepare_teacher
from compress.train.distributed import distributed_env
from compress.train.trainer import StepOutput, TrainConfig, Trainer

VOCAB = 100
# uneven global batches: 7 and 5 rows do not split evenly over 2 processes
BATCH_SIZES = (8, 7, 8, 5)


class TinyEncoder(nn.Module):
    """Embeddings, a torch TransformerEncoder, masked mean pooling and a classifier."""

    def __init__(self, layers: int, labels: int = 3, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.pos = nn.Parameter(torch.randn(12, 32) * 0.02)
        # no biases: the key projection's bias has a gradient of exactly 0 in theory (softmax ignores it), so
        # its computed gradient is rounding noise, which Adam scales up to steps of size lr
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=dropout, batch_first=True, bias=False)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.classifier = nn.Linear(32, labels)
        # never called: it gets no gradient on any rank, so (as in one process) AdamW must leave it as it is
        self.unused_head = nn.Linear(32, labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(input_ids) + self.pos, src_key_padding_mask=attention_mask == 0)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.classifier((h * m).sum(1) / m.sum(1))


def tiny_model(seed: int, layers: int, dropout: float = 0.0) -> TinyEncoder:
    torch.manual_seed(seed)
    return TinyEncoder(layers, dropout=dropout)


def global_batches(epoch: int) -> list[dict[str, torch.Tensor]]:
    """The same global batches on every process (seeded by the epoch), with some right padding."""
    g = torch.Generator().manual_seed(100 + epoch)
    out = []
    for n in BATCH_SIZES:
        ids = torch.randint(1, VOCAB, (n, 12), generator=g)
        lengths = torch.randint(6, 13, (n,), generator=g)
        mask = (torch.arange(12)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def kd_loss(teacher: torch.nn.Module, proj: nn.Module | None = None, temperature: float = 2.0):
    """KL to the teacher's logits; with `proj`, plus an MSE through that trained projection, which lives
    outside the student (an extra module, as the distill pass's hidden-state projections do)."""

    def loss_fn(student: torch.nn.Module, batch: dict, step: int) -> StepOutput:
        with torch.no_grad():
            t = teacher(**batch)
        s = student(**batch)
        kd = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                      reduction="batchmean") * temperature**2
        if proj is None:
            return StepOutput(loss=kd, terms={"kd": float(kd.detach())})
        mse = F.mse_loss(proj(s), t / 20)
        return StepOutput(loss=kd + 0.1 * mse, terms={"kd": float(kd.detach()), "mse": float(mse.detach())})

    return loss_fn


def initial_projection() -> nn.Linear:
    torch.manual_seed(2)
    return nn.Linear(3, 3)


def run(checkpoint_dir: Path | None, steps: int = 6) -> tuple[dict[str, torch.Tensor], dict]:
    teacher = prepare_teacher(tiny_model(0, layers=2))
    teacher.classifier.weight.data *= 20  # a confident teacher: a loss that moves
    student = tiny_model(1, layers=1)
    proj = initial_projection()
    cfg = TrainConfig(steps=steps, lr=3e-3, warmup_ratio=0.2, max_grad_norm=1.0, seed=0, checkpoint_every=4)
    trainer = Trainer(student, cfg, loss_fn=kd_loss(teacher, proj), train_batches=global_batches,
                      checkpoint_dir=checkpoint_dir, extra_modules={"proj": proj})
    result = trainer.train()
    result["ddp"] = trainer.ddp is not None
    state = {**student.state_dict(), **{f"proj.{k}": v for k, v in proj.state_dict().items()}}
    return {k: v.detach().clone() for k, v in state.items()}, result


if __name__ == "__main__":
    torch.set_num_threads(1)
    out, ckpt = Path(sys.argv[1]), Path(sys.argv[2])
    state, result = run(ckpt)
    env = distributed_env()
    if env is None or env[0] == 0:
        torch.save({"state": state, "result": result, "world_size": env[1] if env else 1}, out)
