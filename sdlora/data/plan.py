"""The batch plan: every optimizer step of a run, per process, and the run's length and learning rates."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..buckets import epoch_batches


@dataclass
class Step:
    """One optimizer step: its micro-batches (lists of example keys: (epoch, index), or (epoch, index, copy)
    for an image's later repeats in an epoch) and where it sits in the run."""

    number: int  # 1-based global step
    epoch: int
    micro_batches: list[list[tuple[int, ...]]]
    last_of_epoch: bool


@dataclass(frozen=True)
class BatchPlan:
    """What decides the order of batches: the examples trained on (dataset indices), their buckets, how often
    each trains an epoch (kohya's num_repeats), and the regularisation (class) examples beside them.

    kohya's epoch: every instance image `repeats` times; regularisation images as many times in all as that,
    taken in turn from where the last epoch stopped (so a small class set repeats, a large one is used a part
    an epoch), each pass of an image a copy of its own (its own flip, crop and caption draws)."""

    indices: list[int]  # dataset indices of the instance examples (held-out ones excluded)
    buckets: list[tuple[int, int]]  # bucket of each instance example
    batch_size: int
    accumulation: int
    seed: int
    repeats: tuple[int, ...] | None = None  # per instance example; None: each once
    reg_indices: tuple[int, ...] = ()
    reg_buckets: tuple[tuple[int, int], ...] = ()

    def epoch_examples(self, epoch: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(the epoch's (dataset index, copy) examples, their buckets), instance examples first."""
        repeats = self.repeats or (1,) * len(self.indices)
        examples = [(i, c) for i, r in zip(self.indices, repeats) for c in range(r)]
        buckets = [b for b, r in zip(self.buckets, repeats) for _ in range(r)]
        if self.reg_indices:
            n, start = len(examples), epoch * len(examples)
            for k in range(start, start + n):
                examples.append((self.reg_indices[k % len(self.reg_indices)], k // len(self.reg_indices)))
                buckets.append(self.reg_buckets[k % len(self.reg_indices)])
        return examples, buckets

    def epoch_keys(self, epoch: int, rank: int, world: int) -> list[list[tuple[int, ...]]]:
        """This process's batches of example keys in `epoch`: every world-th batch of the epoch."""
        examples, buckets = self.epoch_examples(epoch)
        batches = epoch_batches(buckets, self.batch_size, self.seed, epoch, world)
        return [[_key(epoch, *examples[i]) for i in b] for b in batches[rank::world]]

    def epoch(self, epoch: int, rank: int, world: int) -> list[list[int]]:
        """This process's batches (dataset indices) in `epoch`."""
        return [[key[1] for key in batch] for batch in self.epoch_keys(epoch, rank, world)]

    def steps_per_epoch(self, world: int) -> int:
        return math.ceil(len(self.epoch_keys(0, 0, world)) / self.accumulation)

    @property
    def examples_per_epoch(self) -> int:
        return len(self.epoch_examples(0)[0])

    def steps(self, rank: int, world: int, total_steps: int) -> list[Step]:
        """Every optimizer step of the run, in order; a step never spans an epoch boundary."""
        steps: list[Step] = []
        epoch = 0
        while len(steps) < total_steps:
            batches = self.epoch_keys(epoch, rank, world)
            groups = [batches[s : s + self.accumulation] for s in range(0, len(batches), self.accumulation)]
            for g, group in enumerate(groups):
                steps.append(Step(len(steps) + 1, epoch, group, g == len(groups) - 1))
                if len(steps) == total_steps:
                    break
            epoch += 1
        return steps


def _key(epoch: int, index: int, copy: int) -> tuple[int, ...]:
    """An example's key: (epoch, index) for its first pass in an epoch, as before repeats existed, so that
    every random draw of a run without repeats stays what it was; (epoch, index, copy) for later ones."""
    return (epoch, index) if copy == 0 else (epoch, index, copy)


@dataclass(frozen=True)
class Schedule:
    """The run's length and learning rates, derived from the flags and the batch plan."""

    max_train_steps: int
    num_train_epochs: int
    learning_rate: float  # after --scale_lr
    unet_lr: float  # the denoiser's (default: learning_rate)
    text_encoder_lr: float  # (default: learning_rate)


def resolve_schedule(opt, plan: BatchPlan, world: int) -> Schedule:
    """Total steps and epochs with the diffusers example's epoch/step arithmetic (opt:
    config.train.OptimizationConfig); --scale_lr applied here, where the batch size is known."""
    per_epoch = plan.steps_per_epoch(world)
    steps = opt.max_train_steps if opt.max_train_steps is not None else opt.num_train_epochs * per_epoch
    scale = opt.gradient_accumulation_steps * opt.train_batch_size * world if opt.scale_lr else 1
    lr = opt.learning_rate * scale
    return Schedule(
        steps,
        math.ceil(steps / per_epoch),
        lr,
        opt.unet_lr * scale if opt.unet_lr is not None else lr,
        opt.text_encoder_lr * scale if opt.text_encoder_lr is not None else lr,
    )
