"""`train.batch_size: auto` inside the trainer: the probe before step 1, and one back-off from a CUDA out-of-memory.

The launch (multitune.launch.autofit) chooses the micro-batch from the memory model; this module checks it on the
card and keeps the run alive when the card disagrees, without changing what is trained:

- :func:`confirm`: before step 1, one forward and backward of a synthetic worst-case micro-batch (model.max_length
  tokens a row, as many supervised tokens as the memory model charges: each row's longest answer, or for packed rows
  the share of answer tokens at the data's longest answer and mean length) with the gradients and AdamW's two moments
  allocated (and DDP's gradient buckets beside several processes). Out of memory there: the next micro-batch down
  (then checkpointing), agreed across ranks. Nothing in it is a collective, so a rank that fails leaves none waiting.
- Out of memory is CUDA's ``torch.OutOfMemoryError`` or an allocation failure that reaches Python as a plain
  ``RuntimeError`` (:func:`out_of_memory`): either, on one rank, is every rank's agreed out-of-memory.
- :class:`OomBackoff`: a CUDA out-of-memory in the first ``watch_steps`` optimizer steps of the launch (a resume's
  first steps too, not only the run's) halves the micro-batch and doubles the accumulation, once: every micro-batch the data loader yields is run as two halves, so the data order,
  the examples per optimizer step, the schedule and the step counter are those of the run so far, and the step that
  failed is redone from its first micro-batch (its gradients are zeroed; weights and optimizer are untouched until its
  optimizer step). The checkpoints record the back-off (their COMPLETE marker's ``oom_split``), so a launch that
  resumes one keeps the halved micro-batch (multitune.launch.autofit.confirm_on).

Why not transformers' ``auto_find_batch_size`` (accelerate's ``find_executable_batch_size``): it restarts the
training loop from step 0 with half the per-device batch and the same accumulation, so the global batch (and with it
the schedule and the optimizer's trajectory) changes, and the steps already taken are lost; the issue asks for the
same global batch, continued at the same step. Nothing in transformers, accelerate or TRL splits a micro-batch.

Several processes: DDP reduces gradients inside the last micro-batch's backward and the losses gather metrics inside
the forward, so a rank that ran out of memory would leave the others waiting in those collectives. In the watched
steps every micro-batch runs without DDP's reduction (``no_sync``), each metric gather is preceded by an agreement,
the rank that failed answers the same agreement, and the gradients are averaged by one explicit all-reduce at the
step's end. Under FSDP every forward is a collective: neither the probe nor the back-off can be agreed there.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
from collections.abc import Mapping

import torch

from multitune.distributed import any_rank, main_print, world_size
from multitune.errors import UserError
from multitune.training.checkpoints import CompleteMarker


class AgreedOom(Exception):
    """Raised on every rank once any rank ran out of memory in a watched micro-batch."""


# Allocation failures raised as a plain RuntimeError (torch.AcceleratorError), not torch.OutOfMemoryError, because
# they come from outside PyTorch's caching allocator:
ALLOCATION_FAILURES = (
    # cuBLAS could not allocate its handle or workspace: ATen's TORCH_CUDABLAS_CHECK (ATen/cuda/Exceptions.h) raises
    # "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`" (or `cublasLtMatmul(...)`, ...)
    "CUBLAS_STATUS_ALLOC_FAILED",
    # cudaErrorMemoryAllocation from a CUDA call checked by C10_CUDA_CHECK (c10/cuda/CUDAException.h: "CUDA error: "
    # + cudaGetErrorString): a cudaMalloc outside the caching allocator, e.g. a kernel library's own workspace
    "CUDA error: out of memory",
)


def out_of_memory(error: BaseException) -> bool:
    """CUDA's out-of-memory, or an allocation failure that reaches Python as a RuntimeError (ALLOCATION_FAILURES)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and any(s in str(error) for s in ALLOCATION_FAILURES))


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def split_batch(inputs: dict, parts: int) -> list[dict]:
    """``inputs`` cut into ``parts`` micro-batches of consecutive rows; one padding-free row (packing) is cut at the
    sequence starts nearest to equal shares (its flash-attention boundaries recomputed)."""
    ids = inputs["input_ids"]
    rows, length = ids.shape
    if rows >= parts:
        bounds = [round(i * rows / parts) for i in range(parts + 1)]
        return [{k: v[a:b] if torch.is_tensor(v) and v.dim() > 0 and v.size(0) == rows else v for k, v in inputs.items()}
                for a, b in itertools.pairwise(bounds)]
    starts = (inputs["position_ids"][0] == 0).nonzero().flatten().tolist() if "position_ids" in inputs and rows == 1 else []
    cuts = sorted({min(starts, key=lambda s: abs(s - i * length / parts)) for i in range(1, parts)} - {0})
    if len(cuts) < parts - 1:
        raise UserError(f"out of memory on a micro-batch of {rows} row(s) of {length} tokens that cannot be halved; set a "
                        "shorter model.max_length, peft.method=qlora, or train on a larger GPU")
    out = []
    for a, b in zip([0, *cuts], [*cuts, length]):
        piece = {k: v[..., a:b] if torch.is_tensor(v) and v.dim() == 2 and v.size(1) == length else v for k, v in inputs.items()}
        if "cu_seq_lens_q" in inputs:  # TRL's padding-free collator: the boundaries of the piece's own sequences
            first = (piece["position_ids"][0] == 0).nonzero().flatten()
            cu = torch.cat([first, torch.tensor([b - a])]).to(torch.int32).to(inputs["cu_seq_lens_q"].device)
            piece["cu_seq_lens_q"] = piece["cu_seq_lens_k"] = cu
            piece["max_length_q"] = piece["max_length_k"] = int(cu.diff().max())
        if "seq_idx" in inputs:
            piece["seq_idx"] = inputs["seq_idx"][..., a:b] - inputs["seq_idx"][..., a:a + 1]
        out.append(piece)
    return out


def _reduce_gradients(model: torch.nn.Module) -> None:
    """What DDP's backward does at a step's last micro-batch: every trainable gradient averaged over the ranks."""
    import torch.distributed as dist

    if world_size() == 1:
        return
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world_size()
    for g, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(reduced)


class OomBackoff:
    """Mixin, before the Trainer class in the bases: one back-off from out-of-memory in the first ``watch_steps`` steps."""

    watch_steps = 0  # optimizer steps watched (the launch sets it for train.batch_size: auto; 0 under FSDP)
    oom_split = 1  # every micro-batch from the data loader runs as this many pieces (2 after the back-off)
    _kept: tuple[int, list] = (-1, [])  # the watched step and its micro-batches so far (to redo it)
    _logged: tuple = ()  # what the loss had logged when the watched step began (the redo logs its micro-batches again)
    _first_step: int | None = None  # the launch's first step: a resume starts past the run's first steps

    def split_micro_batches(self, parts: int) -> None:
        """Run every micro-batch as ``parts`` pieces from now on, and record it in the checkpoints' markers."""
        self.oom_split = parts
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, CompleteMarker):
                cb.oom_split = parts

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._first_step is None:
            self._first_step = self.state.global_step  # set by a resume before the first micro-batch
        if self.state.global_step >= self._first_step + self.watch_steps:
            self._kept = (-1, [])
            return self._pieces(model, inputs, num_items_in_batch, agree=False)
        if self._kept[0] != self.state.global_step:
            self._kept, self._logged = (self.state.global_step, []), self._log_state()
        self._kept[1].append(inputs)
        last = self.accelerator.sync_gradients  # this micro-batch ends the optimizer step
        failed = False
        try:
            loss = self._watched(model, inputs, num_items_in_batch)
        except AgreedOom:
            failed = True
        if failed:  # outside the handler: the failed forward's tensors are released with its traceback
            loss = self._back_off(model, num_items_in_batch)
        if last:
            _reduce_gradients(model)
        return loss

    def _watched(self, model, inputs, num_items_in_batch):
        """The micro-batch with no collective that a rank out of memory would miss: DDP's reduction deferred to the
        step's end, an agreement before each metric gather and after each piece (one all-reduce each, every rank)."""
        local = self.accelerator.no_sync(model) if world_size() > 1 else contextlib.nullcontext()
        with local, self._agreeing_gathers():
            return self._pieces(model, inputs, num_items_in_batch, agree=True)

    def _split(self, inputs) -> list[dict]:
        """The micro-batch's pieces; a batch that one rank cannot halve (a packed row of one sequence) is one error on
        every rank, agreed (one all-reduce, every rank, each split micro-batch) before any rank runs a piece."""
        if self.oom_split == 1:
            return [inputs]
        try:
            pieces, error = split_batch(inputs, self.oom_split), None
        except UserError as e:
            pieces, error = None, e
        if any_rank(error is not None):
            raise error or UserError("out of memory on another rank's micro-batch, which cannot be halved; set a shorter "
                                     "model.max_length, peft.method=qlora, or train on a larger GPU")
        return pieces

    def _pieces(self, model, inputs, num_items_in_batch, *, agree: bool):
        pieces = self._split(inputs)
        accumulation = self.current_gradient_accumulation_steps
        # a loss that is a mean per micro-batch is divided by the accumulation: each piece weighs what a micro-batch of
        # its size would (a loss normalised by num_items_in_batch, multitune's, is exact either way)
        self.current_gradient_accumulation_steps = accumulation * len(pieces)
        total = None
        try:
            for i, piece in enumerate(pieces):
                oom = False
                with contextlib.nullcontext() if i == len(pieces) - 1 else self.accelerator.no_sync(model):
                    if not agree:
                        loss = super().training_step(model, piece, num_items_in_batch)
                    else:
                        try:
                            loss = super().training_step(model, piece, num_items_in_batch)
                        except RuntimeError as e:  # torch.OutOfMemoryError is one
                            if not out_of_memory(e):
                                raise
                            oom = True
                if agree and any_rank(oom):
                    raise AgreedOom
                total = loss if total is None else total + loss
        finally:
            self.current_gradient_accumulation_steps = accumulation
        return total

    @contextlib.contextmanager
    def _agreeing_gathers(self):
        """Each collective the loss makes (accelerate's gathers, for logged metrics) preceded by the agreement."""
        if world_size() == 1:
            yield
            return
        acc = self.accelerator

        def agreed(fn):
            def call(*args, **kwargs):
                if any_rank(False):
                    raise AgreedOom
                return fn(*args, **kwargs)
            return call

        names = ("gather_for_metrics", "gather", "reduce")
        for name in names:
            setattr(acc, name, agreed(getattr(acc, name)))
        try:
            yield
        finally:
            for name in names:
                delattr(acc, name)  # the class's methods again

    def _log_state(self) -> tuple:
        """The loss path's running logs (each task's sums, the token count, TRL's per-micro-batch metrics)."""
        losses = getattr(self, "task_losses", None)
        sums = losses.sums.clone() if losses is not None and losses.sums is not None else None
        metrics = getattr(self, "_metrics", {}).get("train", {})
        return sums, getattr(self, "_total_train_tokens", 0), {k: len(v) for k, v in metrics.items()}

    def _restore_log_state(self) -> None:
        sums, tokens, lengths = self._logged
        if getattr(self, "task_losses", None) is not None:
            self.task_losses.sums = sums
        if hasattr(self, "_total_train_tokens"):
            self._total_train_tokens = tokens
        for key, values in getattr(self, "_metrics", {}).get("train", {}).items():
            del values[lengths.get(key, 0):]

    def _back_off(self, model, num_items_in_batch):
        """Half the micro-batch, twice the accumulation; the failed step redone from its first micro-batch."""
        step, kept = self._kept
        micro, accumulation = self.args.per_device_train_batch_size, self.args.gradient_accumulation_steps
        if self.oom_split > 1:
            raise UserError(f"out of memory at step {step + 1} even at micro-batch {micro // self.oom_split} (backed off "
                            f"from {micro}); set train.batch_size below it with train.global_batch_size, a shorter "
                            "model.max_length, or train on a larger GPU")
        free_memory()
        model.zero_grad(set_to_none=True)  # the failed step's partial gradients; weights and optimizer are untouched
        self._restore_log_state()  # and what its micro-batches logged: the redo logs them once more
        self.split_micro_batches(2)
        main_print(f"out of memory at step {step + 1} (micro-batch {micro} x {accumulation} accumulation): continuing at "
                   f"micro-batch {micro / 2:g} x {2 * accumulation}, the same examples a step in the same order; step "
                   f"{step + 1} is redone from its first micro-batch")
        loss = None
        for inputs in kept:
            failed = False
            try:
                loss = self._watched(model, inputs, num_items_in_batch)
            except AgreedOom:
                failed = True
            if failed:
                return self._back_off(model, num_items_in_batch)  # split already: one UserError on every rank
        return loss


# ---------------------------------------------------------------- the probe before step 1


def synthetic_batch(rows: int, length: int, supervised: int, vocab: int, packed: bool, device) -> dict:
    """The worst micro-batch the data can make: ``rows`` sequences of ``length`` tokens with ``supervised`` labelled
    tokens in all (as the memory model charges the micro-batch: multitune.launch.plan.step_for), shared evenly and
    each sequence's last real tokens (its answer); padded rows with an explicit attention mask (one padded position),
    or with packing one padding-free row of the sequences. A sequence's first token is never a label (nothing
    predicts it), so at most ``length - 1`` of each (``length - 2`` in the row that ends in padding)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, length), generator=g)
    labels = torch.full_like(ids, -100)
    ends = [length - (1 if r == rows - 1 and not packed else 0) for r in range(rows)]  # after each row's last real token
    for r in range(rows):
        n = min(supervised // rows + (r < supervised % rows), ends[r] - 1)
        labels[r, ends[r] - n:ends[r]] = ids[r, ends[r] - n:ends[r]]
    if packed:  # position_ids restart per sequence, as in real packed rows (the attention kernel takes the boundaries)
        batch = {"input_ids": ids.reshape(1, -1), "labels": labels.reshape(1, -1),
                 "position_ids": torch.arange(length).repeat(rows)[None]}
    else:
        mask = torch.ones_like(ids)
        mask[-1, -1] = 0  # one padded position: the padding mask reaches attention as in a padded batch
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    return {k: v.to(device) for k, v in batch.items()}


def _forward_backward(trainer, batch: dict, ddp_buckets: bool) -> None:
    from multitune.modeling import loss as losses

    model = trainer.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    # the static memory of training that exists before the first step: gradients, AdamW's two moments (allocated lazily
    # by its first step) and, beside several processes, DDP's gradient buckets
    held = [torch.zeros_like(p) for p in trainable for _ in range(3 if ddp_buckets else 2)]
    for p in trainable:
        p.grad = torch.zeros_like(p)
    model.train()
    task_losses = getattr(trainer, "task_losses", None)
    kept = task_losses.sums.clone() if task_losses is not None and task_losses.sums is not None else None
    try:
        with trainer.accelerator.autocast():
            if trainer.mt_cfg.train.loss_positions == "supervised":  # the trainer's loss path, without its gathers
                record = task_losses.recorder(batch["labels"], torch.zeros_like(batch["labels"])) if task_losses else None
                loss = losses.local_loss(model, batch, None, record)[0]
            else:
                loss = model(**batch, use_cache=False).loss
        loss.backward()
    finally:
        if task_losses is not None:  # the synthetic batch's losses are not the window's
            task_losses.sums = kept
    del held


def probe(trainer, rows: int, length: int, supervised: int, packed: bool) -> bool:
    """One forward and backward of the worst micro-batch (``supervised`` labelled tokens in all) on this rank, no
    collective in it; True: out of memory (:func:`out_of_memory`; any other error propagates)."""
    vocab = trainer.model.get_input_embeddings().num_embeddings
    oom = False
    try:
        _forward_backward(trainer, synthetic_batch(rows, length, supervised, vocab, packed, trainer.args.device),
                          world_size() > 1)
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        if not out_of_memory(e):
            raise
        oom = True
    trainer.model.zero_grad(set_to_none=True)
    free_memory()
    return oom


def set_checkpointing(trainer, on: bool) -> None:
    """Gradient checkpointing on the built model and in the arguments train() applies (use_reentrant off, as
    multitune.training.args sets it)."""
    trainer.args.activation_checkpointing = on
    trainer.args.activation_checkpointing_kwargs = {"use_reentrant": False} if on else None
    if on:
        trainer.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def confirm(trainer, ladder: list[tuple[int, bool]], per_rank: int, length: int, supervised: Mapping[int, int],
            packed: bool) -> tuple[int, bool]:
    """The first (micro-batch, checkpointing) of ``ladder`` whose probe fits on every rank, set in the trainer's arguments
    with the accumulation that keeps ``per_rank`` examples a step. ``supervised[m]``: the labelled tokens of a
    micro-batch of m rows as the memory model charges them. One agreement (all-reduce) per rung, on every rank."""
    for micro, checkpointing in ladder:
        if checkpointing and not trainer.args.activation_checkpointing:
            set_checkpointing(trainer, True)
        if not any_rank(probe(trainer, micro, length, supervised[micro], packed)):
            trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps = micro, per_rank // micro
            trainer._train_batch_size = trainer.args.train_batch_size  # what Trainer's own auto_find_batch_size resets
            return micro, checkpointing
        main_print(f"auto-fit probe: out of memory at micro-batch {micro} x {length} tokens"
                   f"{' with checkpointing' if checkpointing else ''}; trying the next smaller")
    raise UserError(f"out of memory on one micro-batch of {length} tokens even with gradient checkpointing (the probe "
                    "before step 1); set a shorter model.max_length, peft.method=qlora, or train on a larger GPU")
