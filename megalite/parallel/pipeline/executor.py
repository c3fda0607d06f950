"""Run a pipeline schedule: one rank's passes, in its order, with a real model and real messages.

The order comes from ``orders.py``.  Messages move as the data flows: a rank posts the send of a
forward output (or input gradient) as soon as the pass that produced it has run, posts receives
ahead of need, and waits only for the one message the pass it is about to run consumes; sends are
never waited for until the step ends.  So a rank stalls only when its own next pass lacks its
input, as in the simulator's dependency rules, never on a message some later pass needs or on a
peer that has not yet reached a point of its order.  (The simpler scheme, each message exchanged as
one blocking batch at its unit-cost simulated time, makes every rank wait for its peer's progress
through the unit-cost order: a measured bubble of 0.39 for interleaved 1F1B at p=2, m=4, v=2
against the formula's 0.125.)

Posting order: the messages of one step are listed once, by simulating the order with unit costs
(``simulator.py``), sorted by simulated time; each rank posts its messages in that list's order,
stopping at a send whose tensor its passes have not produced yet.  Every message due at or before
a pass's simulated start comes from a pass that precedes it on this rank, so the receive a pass
waits for has always been posted; both ends post the messages between them in the same order.

Backward passes:

- ``B`` without a split (GPipe, 1F1B, interleaved): ``torch.autograd.backward`` from the stage
  output's gradient edge; the received input (a leaf) collects the gradient to send back.
- ``B`` and ``W`` for ZB-H1: during F, forward hooks note the output ``y`` of every module that owns
  parameters directly.  B asks autograd for the gradients of the stage input *and* of those
  outputs, keeping the graph; autograd skips the weight-gradient branches (no parameter is asked
  for).  W then runs, per module, ``backward(y, dL/dy, inputs=module's parameters)``, which walks only
  from ``y`` back into that module's own parameters.  This needs every parameter to be used inside
  the forward of the module that owns it (true of GPTModel); a parameter no hook covers is refused.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Dict, List, Optional

import torch

from megalite.parallel.data_parallel import unwrap_model
from megalite.parallel.state import ProcessGrid, get_grid

from .microbatch import forward_and_loss
from .orders import Pass, ScheduleOrder, build_order
from .p2p import Postbox, message_shape, release_output
from .simulator import messages, simulate
from .timeline import Timeline, record


def pipelined_forward_backward(*, schedule: str, forward_step_func, data_iterator, model, num_microbatches: int,
                               seq_length: int, micro_batch_size: int, forward_only: bool = False,
                               no_sync_func=None, grid: Optional[ProcessGrid] = None,
                               timeline: Optional[Timeline] = None) -> List[dict]:
    if grid is None:
        grid = get_grid()
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    v = grid.virtual_pp_size or 1
    if len(chunks) != v:
        raise ValueError(f"rank {grid.rank} holds {len(chunks)} model chunks but the virtual pipeline size is {v}")
    order = build_order(schedule, grid.pp_size, num_microbatches, v, forward_only)
    stage = StageRunner(order, chunks, grid, forward_step_func, data_iterator, seq_length, micro_batch_size,
                        forward_only, no_sync_func, timeline)
    return stage.run()


class StageRunner:
    """One rank's state during one step: received inputs, outputs awaiting their gradient, ..."""

    def __init__(self, order: ScheduleOrder, chunks: List[torch.nn.Module], grid: ProcessGrid, forward_step_func,
                 data_iterator, seq_length: int, micro_batch_size: int, forward_only: bool, no_sync_func,
                 timeline: Optional[Timeline]):
        self.order, self.chunks, self.grid = order, chunks, grid
        self.p, self.v, self.rank = order.pp_size, order.virtual_pp_size, grid.pp_rank
        self.num_microbatches = order.num_microbatches
        self.forward_step_func, self.forward_only = forward_step_func, forward_only
        self.feeds = microbatch_feeds(data_iterator, self.v)
        self.no_sync = no_sync_func or contextlib.nullcontext
        self.timeline = timeline
        model = unwrap_model(chunks[0])
        self.shape = message_shape(model.config.hidden_size, seq_length, micro_batch_size, grid.cp_size, grid.tp_size,
                                   getattr(model, "sequence_parallel", False))
        self.dtype = next((p.dtype for p in chunks[0].parameters() if p.is_floating_point()), torch.float32)
        self.device = next((p.device for p in chunks[0].parameters()), torch.device("cpu"))
        self.passes = order.per_rank[self.rank]
        self.messages = [m for m in messages(order, simulate(order)) if self.rank in (m.src, m.dst)]
        self.next_message = 0                         # the first message of self.messages not yet posted
        self.postbox = Postbox(grid.pp_group)
        self.arriving: Dict[tuple, tuple] = {}      # (kind, micro-batch, virtual stage) -> (work, buffer)
        weight_kind = "W" if order.split_backward else "B"
        self.last_weight_pass = max((i for i, s in enumerate(self.passes) if s.kind == weight_kind), default=-1)
        # (micro-batch, chunk) -> tensors in flight
        self.inputs: Dict[tuple, torch.Tensor] = {}
        self.outputs: Dict[tuple, object] = {}        # stage output tensor, its gradient edge once sent, or loss
        self.output_grads: Dict[tuple, torch.Tensor] = {}
        self.input_grads: Dict[tuple, torch.Tensor] = {}
        self.weight_work: Dict[tuple, list] = {}
        self.captured: Dict[tuple, list] = {}
        self.losses: List[dict] = []
        self.activations = LiveActivations() if timeline is not None else None

    def run(self) -> List[dict]:
        for index, step in enumerate(self.passes):
            self.post_messages()
            self.await_inputs(step)
            tagged = self.activations.tagged((step.microbatch, step.chunk)) if self.activations else None
            with tagged or contextlib.nullcontext():
                with record(self.timeline, step.kind, step.microbatch, step.chunk):
                    with self.sync_context(index, step):
                        getattr(self, "run_" + step.kind)(step)
            if self.activations:
                self.activations.sample()
        self.post_messages()
        self.postbox.wait_all()
        if self.next_message < len(self.messages) or self.arriving:
            raise RuntimeError(f"pipeline rank {self.rank} ended its step with messages unsent or unread: "
                               f"{self.messages[self.next_message:][:4]} {sorted(self.arriving)[:4]}")
        if self.activations:
            self.timeline.peak_live_activations = self.activations.peak
        return self.losses

    def sync_context(self, index: int, step: Pass):
        """DDP reduces gradients once per step: during the rank's last weight-gradient pass."""
        if self.forward_only or step.kind == "F" or index == self.last_weight_pass:
            return contextlib.nullcontext()
        return self.no_sync()

    # -- the three passes ---------------------------------------------------------------------------
    def run_F(self, step: Pass) -> None:
        key, chunk = (step.microbatch, step.chunk), self.chunks[step.chunk]
        first, last = self.is_first(step.chunk), self.is_last(step.chunk)
        unwrap_model(chunk).set_input_tensor(None if first else self.inputs[key])
        feed = self.feeds[step.chunk].for_microbatch(step.microbatch)
        hooks = self.capture_module_outputs(chunk, key) if self.order.split_backward else []
        try:
            with torch.set_grad_enabled(not self.forward_only):
                if last:
                    loss = forward_and_loss(self.forward_step_func, feed, chunk, self.num_microbatches, self.losses)
                    if not self.forward_only:
                        self.outputs[key] = loss
                else:
                    output, _ = self.forward_step_func(feed, chunk)
                    if tuple(output.shape) != self.shape:
                        raise RuntimeError(f"stage output of shape {tuple(output.shape)} does not match the pipeline "
                                           f"message shape {self.shape} [s(/tp under SP), b, h]")
                    self.outputs[key] = output
        finally:
            for hook in hooks:
                hook.remove()
        if self.forward_only:
            self.inputs.pop(key, None)

    def run_B(self, step: Pass) -> None:
        key = (step.microbatch, step.chunk)
        output = self.outputs.pop(key)
        grad = None if self.is_last(step.chunk) else [self.output_grads.pop(key)]
        stage_input = self.inputs.pop(key, None)
        if not self.order.split_backward:
            torch.autograd.backward([output], grad)
            if stage_input is not None:
                self.input_grads[key] = stage_input.grad
            return
        captured = self.captured.pop(key)
        targets = ([stage_input] if stage_input is not None else []) + [y for y, _ in captured]
        grads = torch.autograd.grad([output], targets, grad, retain_graph=True, allow_unused=True)
        if stage_input is not None:
            self.input_grads[key], grads = grads[0], grads[1:]
        self.weight_work[key] = [(y, dy, params) for (y, params), dy in zip(captured, grads) if dy is not None]

    def run_W(self, step: Pass) -> None:
        for y, dy, params in self.weight_work.pop((step.microbatch, step.chunk)):
            torch.autograd.backward([y], [dy], inputs=params)

    def capture_module_outputs(self, chunk, key) -> list:
        """Forward hooks noting (output, own parameters) of each module that owns parameters directly."""
        captured, covered = self.captured.setdefault(key, []), set()

        def hook(module, args, output):
            params = [p for p in module.parameters(recurse=False) if p.requires_grad]
            outputs = output if isinstance(output, (tuple, list)) else [output]
            for y in outputs:
                if isinstance(y, torch.Tensor) and y.requires_grad:
                    captured.append((y, params))
                    covered.update(id(p) for p in params)

        handles = [m.register_forward_hook(hook) for m in chunk.modules()
                   if any(p.requires_grad for p in m.parameters(recurse=False))]

        def check_coverage():
            missing = [n for n, p in chunk.named_parameters() if p.requires_grad and id(p) not in covered]
            if missing:
                raise RuntimeError(f"zb-h1 cannot split the backward: parameters {missing[:4]} were not used by the "
                                   f"forward of the module that owns them (activation recompute is not supported "
                                   f"with zb-h1); use the 1f1b schedule")

        class CoverageCheck:
            def remove(self):
                if not self.__dict__.get("done"):
                    self.done = True
                    check_coverage()
        return handles + [CoverageCheck()]

    # -- messages -------------------------------------------------------------------------------------
    def post_messages(self) -> None:
        """Post, in the list's order, every message that can go now: a receive at once, a send once
        its tensor exists; stop at the first send whose producing pass has not run yet."""
        pp_ranks = self.grid.ranks["pp"]
        while self.next_message < len(self.messages):
            msg = self.messages[self.next_message]
            tag = 2 * (msg.microbatch * self.p * self.v + msg.virtual_stage) + (msg.kind == "grad")
            if msg.src == self.rank:
                tensor = self.take_outgoing(msg)
                if tensor is None:
                    break
                self.postbox.send(tensor.contiguous(), pp_ranks[msg.dst], tag)
            else:
                buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                work = self.postbox.recv(buffer, pp_ranks[msg.src], tag)
                self.arriving[(msg.kind, msg.microbatch, msg.virtual_stage)] = (work, buffer)
            self.next_message += 1
        self.postbox.reap()

    def take_outgoing(self, msg) -> Optional[torch.Tensor]:
        """The tensor ``msg`` carries, or None while the pass producing it has not run."""
        if msg.kind == "activation":
            key = (msg.microbatch, (msg.virtual_stage - 1) // self.p)
            if key not in self.outputs:
                return None
            output = self.outputs.pop(key)
            if not self.forward_only:
                # Past this point only the autograd graph needs the output, not our reference to it.
                self.outputs[key] = release_output(output)
            return output.detach()
        return self.input_grads.pop((msg.microbatch, (msg.virtual_stage + 1) // self.p), None)

    def await_inputs(self, step: Pass) -> None:
        """Wait for the one message ``step`` consumes: its input activation (F) or output gradient (B)."""
        key, stage = (step.microbatch, step.chunk), step.chunk * self.p + self.rank
        if step.kind == "F" and not self.is_first(step.chunk):
            self.inputs[key] = self.receive("activation", step.microbatch, stage).requires_grad_(not self.forward_only)
        elif step.kind == "B" and not self.is_last(step.chunk):
            self.output_grads[key] = self.receive("grad", step.microbatch, stage)

    def receive(self, kind: str, microbatch: int, stage: int) -> torch.Tensor:
        work, buffer = self.arriving.pop((kind, microbatch, stage))
        work.wait()
        return buffer

    def is_first(self, chunk: int) -> bool:
        return self.rank == 0 and chunk == 0

    def is_last(self, chunk: int) -> bool:
        return self.rank == self.p - 1 and chunk == self.v - 1


def microbatch_feeds(data_iterator, v: int) -> list:
    """One feed per chunk: from a list of iterators, one per chunk (Megatron's interleaved
    convention), or one feed shared by every chunk when a single iterator is given."""
    if isinstance(data_iterator, (list, tuple)):
        if len(data_iterator) != v:
            raise ValueError(f"got {len(data_iterator)} data iterators for {v} model chunks")
        return [MicrobatchFeed(it) for it in data_iterator]
    return [MicrobatchFeed(data_iterator)] * v


class MicrobatchFeed:
    """Hands micro-batch ``i`` of a data iterator to whichever pass asks for it, in any order.

    Schedules reach micro-batches out of order across chunks (interleaved), so each forward gets an
    iterator that yields exactly its own micro-batch; batches are drawn from the source in order
    and kept for the step.  Shared between chunks when one iterator serves them all.
    """

    def __init__(self, source):
        self.source = source
        self.batches: list = []

    def for_microbatch(self, microbatch: int):
        if self.source is None:
            return None
        feed = self

        class OneBatch:
            def __iter__(self):
                return self

            def __next__(self):
                while len(feed.batches) <= microbatch:
                    feed.batches.append(next(feed.source))
                return feed.batches[microbatch]
        return OneBatch()


class LiveActivations:
    """Counts the (micro-batch, chunk) pairs whose saved-for-backward tensors are still alive.

    A ``saved_tensors_hooks`` pair wraps every tensor autograd saves in a small holder tagged with
    the pass that saved it; a holder dies when autograd frees it (after backward, or when the graph
    is dropped), so the live tags are what the stage really keeps, not what the schedule intends.
    """

    def __init__(self):
        self.holders = weakref.WeakSet()
        self.peak = 0

    @contextlib.contextmanager
    def tagged(self, key):
        class Holder:
            __slots__ = ("tensor", "key", "__weakref__")

        def pack(tensor):
            holder = Holder()
            # detach: a saved *output* would otherwise point back at its own grad_fn through the
            # holder, a reference cycle that outlives the graph until the garbage collector runs.
            holder.tensor, holder.key = tensor.detach(), key
            self.holders.add(holder)
            return holder

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda holder: holder.tensor):
            yield

    def sample(self) -> None:
        self.peak = max(self.peak, len({h.key for h in self.holders}))
