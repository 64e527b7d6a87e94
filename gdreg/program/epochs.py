"""What each epoch trains on: its mode, its blocks or minibatches, and its optimizer steps.

An *epoch* is one pass over the training set (the reference implementation's "step" in both
of its modes). In full-batch mode it is one optimizer step over all blocks; in stochastic mode
``N // batch_size`` minibatch steps. The reference's sanity checks around the SGD baseline
(``config/hyp/_default_hyperparams.yaml``) are options of the plan:

- ``train.switch_mode_after = K``: the first K epochs train in ``train.mode``, the rest in
  the other mode, as the reference's ``train_switch_stochastic`` describes itself ("switch
  from stochastic to non-stochastic or vice-versa after this many steps"). Its loop does
  otherwise: the test ``K >= step`` holds at step 0 and flips the mode, and nothing flips it
  back, so a reference run with the option set trains in the other mode throughout.
- ``train.sample_with_replacement``: stochastic epochs draw their ``N`` images uniformly with
  replacement (torch's ``RandomSampler(replacement=True)``) instead of a permutation.
- ``train.semi_stochastic``: with ``data.augmentation="fixed"`` (``data.copies = R``
  augmented copies of the N images, view ``v`` = copy ``v // N`` of image ``v % N``),
  stochastic epoch ``e`` takes minibatches from copy ``e mod R`` only (the reference's
  ``train_semi_stochastic`` over a database of ``rounds`` copies).

Every draw is a function of ``(seed, epoch)``, so a resumed run repeats it exactly. The
learning-rate schedule moves once per epoch in both modes; :meth:`EpochPlan.epoch_of_step`
maps the optimizer's step count to its epoch across a switch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gdreg.engine.fullbatch import block_layout

FULLBATCH, STOCHASTIC = "fullbatch", "stochastic"


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """The modes and step counts of a run's epochs."""

    mode: str  # train.mode: the mode of the first epochs
    switch_after: int  # epochs in ``mode`` before the other mode takes over; 0: never
    steps: dict[str, int]  # optimizer steps of one epoch in each mode

    def mode_of(self, epoch: int) -> str:
        """The mode epoch ``epoch`` (counted from 0) trains in."""
        if self.switch_after and epoch >= self.switch_after:
            return STOCHASTIC if self.mode == FULLBATCH else FULLBATCH
        return self.mode

    def first_step(self, epoch: int) -> int:
        """The optimizer steps taken before epoch ``epoch``."""
        before = min(epoch, self.switch_after) if self.switch_after else epoch
        after = epoch - before
        return before * self.steps[self.mode] + after * self.steps[self.mode_of(epoch)]

    def epoch_of_step(self, step: jax.Array) -> jax.Array:
        """The epoch of optimizer step ``step`` (an integer array; under ``jit`` too)."""
        step = jnp.asarray(step)
        first = self.steps[self.mode]
        if not self.switch_after:
            return step // first
        boundary = self.switch_after * first
        later = self.switch_after + (step - boundary) // self.steps[self.mode_of(self.switch_after)]
        return jnp.where(step < boundary, step // first, later)


def epoch_plan(
    config: ml_collections.ConfigDict, num_virtual_images: int, num_images: int
) -> EpochPlan:
    """The plan of ``config.train`` over ``num_virtual_images`` training views
    (``num_images`` base images)."""
    train = config.train
    per_epoch = num_images if train.semi_stochastic else num_virtual_images
    return EpochPlan(
        mode=train.mode,
        switch_after=train.switch_mode_after,
        steps={FULLBATCH: 1, STOCHASTIC: max(per_epoch // train.batch_size, 1)},
    )


def most_blocks(config: ml_collections.ConfigDict, plan: EpochPlan, num_virtual_images: int) -> int:
    """The most blocks one engine call covers in this run: a full-batch epoch's blocks, or a
    stochastic epoch's minibatches (one block each; passes over a whole epoch, such as the
    analysis metrics, take them all at once). ``train.blocks_per_microbatch`` beyond this, per
    device, would only add empty blocks."""
    modes = {plan.mode, plan.mode_of(plan.switch_after)} if plan.switch_after else {plan.mode}
    counts = [plan.steps[STOCHASTIC]] if STOCHASTIC in modes else []
    if FULLBATCH in modes:
        counts.append(num_virtual_images // config.train.block_size)
    return max(max(counts), 1)


def epoch_layouts(
    config: ml_collections.ConfigDict,
    plan: EpochPlan,
    epoch: int,
    num_virtual_images: int,
    num_images: int,
) -> list[np.ndarray]:
    """The block layouts of one epoch: one full-batch layout, or one ``[1, batch_size]``
    layout per minibatch. Drawn from ``(seed, epoch)`` only."""
    train = config.train
    seed = [config.seed, epoch]
    if plan.mode_of(epoch) == FULLBATCH:
        shuffle = train.shuffle_blocks
        return [
            block_layout(
                num_virtual_images,
                train.block_size,
                permutation_seed=np.random.SeedSequence(seed).generate_state(1)[0]
                if shuffle
                else None,
            )
        ]
    rng = np.random.default_rng(seed)
    if train.semi_stochastic:
        copy = epoch % config.data.copies
        pool, offset = num_images, copy * num_images
    else:
        pool, offset = num_virtual_images, 0
    with_replacement = train.sample_with_replacement
    order = rng.integers(0, pool, pool) if with_replacement else rng.permutation(pool)
    order = (order + offset).astype(np.int32)
    size = train.batch_size
    return [order[i * size : (i + 1) * size][None] for i in range(plan.steps[STOCHASTIC])]
