"""The data order of train.py: one permutation of the training pairs per epoch, optionally grouped by length,
dealt out to ranks and cut into micro-batches. Every function is a function of (n, seed, epoch, rank, world)
only, so resuming needs no saved sampler state: a resumed run sees the order an uninterrupted one would.

Where this departs from, or fills a gap in, the paper:
1. Data order: one permutation per epoch from a generator seeded with (seed, epoch), padded by
   wrapping to a multiple of the world size and dealt out round-robin to ranks, as
   torch.utils.data.DistributedSampler does; a rank's micro-batches are consecutive slices of its
   share. With world size W and batch b, the W ranks of one step see exactly the examples that a
   single process with batch W·b would see in that step.
"""
import math

import torch


def epoch_order(n, seed, epoch):
    """The permutation of range(n) used in `epoch` (a fresh seeded generator: no hidden state to save)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def length_grouped_order(order, lengths, group, seed, epoch, mega=16):
    """`order` rearranged so that each run of `group` consecutive indices (one step's micro-batch on
    every rank: world × batch size) holds examples of similar length, as transformers'
    LengthGroupedSampler does: chunks of mega × group indices of `order` are sorted by length
    (longest first), cut into groups, and the full groups are shuffled by a generator seeded with
    (seed, epoch); a last partial group stays last. A function of (order, lengths, seed, epoch) only."""
    span, groups, tail = group * mega, [], []
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda i: -lengths[i])  # stable: ties keep `order`
        for i in range(0, len(chunk), group):
            (groups if len(chunk[i:i + group]) == group else tail).append(chunk[i:i + group])
    g = torch.Generator().manual_seed(seed * 100_003 + epoch + 50_021)
    return [i for k in torch.randperm(len(groups), generator=g).tolist() for i in groups[k]] + [i for t in tail for i in t]


def rank_microbatches(order, rank, world, batch_size):
    """This rank's micro-batches (lists of example indices) for one epoch's order."""
    total = math.ceil(len(order) / world) * world
    padded = (order * math.ceil(total / max(len(order), 1)))[:total]   # wrap, as DistributedSampler
    share = padded[rank:total:world]
    return [share[i:i + batch_size] for i in range(0, len(share), batch_size)]


def steps_per_epoch(n, world, batch_size, grad_accum):
    """Optimizer steps per epoch: ceil(micro-batches per rank / grad_accum)."""
    micro = math.ceil(math.ceil(n / world) / batch_size)
    return math.ceil(micro / grad_accum)
