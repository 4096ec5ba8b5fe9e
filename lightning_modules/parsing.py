"""The parsing system: any encoder-decoder segmentation net, a named-term loss, an optional sampler."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.batch import network_batch
from datamodules.transforms import AUGMENTATION_VERSION
from lightning_modules import mmseg_weights, official_weights
from lightning_modules.checkpoint_io import (
    CheckpointError,
    good_checkpoint,
    nonfinite_weights_message,
    read_checkpoint,
)
from lightning_modules.inference import labels_to_original_affine, scores_to_original
from lightning_modules.metrics import (
    ConfusionMatrix,
    check_mpa_definition,
    make_process_private,
    segmentation_scores,
)
from lightning_modules.nets.heads import logits_align_corners
from lightning_modules.schedulers import per_step_optimization
from lightning_modules.step_state import (
    LOSS,
    StepLog,
    format_terms,
    log_epoch_means,
    norm_sum,
    read_points,
    read_step_log,
    stack_terms,
)
from samplers.regional import RegionalBalancedSampler, sampling_statistics

log = logging.getLogger(__name__)

#: fp16's smallest positive (subnormal) number: a GradScaler scale below it skipped every update.
FP16_SMALLEST = 2.0**-24

# The normalisation after the transfer belongs to the module (any loader of uint8 batches works,
# with or without a datamodule); Lightning's hint to move the hook into the datamodule is moot.
warnings.filterwarnings(
    "ignore", message=r"You have overridden `on_after_batch_transfer` in `LightningModule`"
)


class NonFiniteLossError(FloatingPointError):
    """A NaN or Inf loss, or non-finite weights, stopped the run."""


class NonFiniteWeightsError(NonFiniteLossError):
    """Non-finite weights after finite losses: the run stopped, and no checkpoint of them was
    written."""


def _host_values(*values: Tensor | None) -> list[list | None]:
    """``values`` (integer tensors or None) as nested lists, read in one device transfer."""
    tensors = [v for v in values if isinstance(v, Tensor)]
    if not tensors:
        return [v for v in values]
    flat = torch.cat([t.reshape(-1).long() for t in tensors]).tolist()
    out, offset = [], 0
    for v in values:
        if not isinstance(v, Tensor):
            out.append(v)
            continue
        n = v.numel()
        out.append(torch.tensor(flat[offset : offset + n]).reshape(v.shape).tolist())
        offset += n
    return out


@runtime_checkable
class ScoresOutputs(Protocol):
    """A loss that names the training-only outputs it scores (``losses.ParsingLoss``,
    ``losses.CE2PLoss``)."""

    def scored_outputs(self) -> set[str]:
        """The names of the training-only outputs with a non-zero weight, e.g. ``{"aux"}``."""
        ...


@runtime_checkable
class SwitchableOutputs(Protocol):
    """A net whose training-only outputs can be switched off
    (``lightning_modules.nets.heads.EncoderDecoderNet``)."""

    def score_outputs(self, scored: set[str]) -> list[str]:
        """Keeps the outputs in ``scored`` on, switches the others off, freezes their heads and
        returns their names."""
        ...


def match_outputs_to_loss(net: nn.Module, loss: nn.Module) -> list[str]:
    """Switches off the net's training-only outputs that ``loss`` does not score; freezes their heads.

    The head of every output that is switched off, or computed but not scored, would get no
    gradient: DDP without ``find_unused_parameters`` would wait for it forever (and the optimizer
    would decay it for nothing), so its parameters get ``requires_grad=False``. A loss that does not
    name its scored outputs (:class:`ScoresOutputs`) scores none of them; a net without switches
    (:class:`SwitchableOutputs`) is left alone.

    Returns:
        The names of the outputs whose heads were frozen (e.g. ``["aux"]`` in RIM stage 2).
    """
    if not isinstance(net, SwitchableOutputs):
        return []
    scored = loss.scored_outputs() if isinstance(loss, ScoresOutputs) else set()
    frozen = net.score_outputs(scored)
    if frozen:
        log.info("outputs not weighted by the loss, heads frozen: %s", ", ".join(frozen))
    return frozen


class ParsingLitModule(pl.LightningModule):
    """Semantic / human parsing with a dense-prediction net.

    Args:
        net: module mapping ``(B, 3, h, w)`` images to ``{"out": (B, C, h, w), "aux": ...}`` logits.
        loss: ``loss(outputs, target, sample_mask) -> {"loss": ..., "loss/<term>": ...}``.
        optimizer: partial optimizer taking ``params``.
        scheduler: partial ``(optimizer, steps_per_epoch) -> LRScheduler`` stepped every step, or None.
        sampler: regional sampler turning a target ``(B, H, W)`` into a keep mask, or None.
        num_classes: number of classes C.
        class_names: C names for tables and logs.
        ignore_index: label value excluded from loss and metrics.
        freeze_encoder: freeze the net's encoder, BatchNorm statistics included (RIM stage 2).
        track_train_confusion: accumulate a confusion matrix of the training batches every
            epoch (``train/mIoU``, ...; an arg-max and a histogram per step). Off, it is kept
            only in the epoch whose statistics ARBS needs (``CPASnapshot``).
        channels_last: run the net in channels-last memory format (faster convolutions on GPU).
        compile: ``torch.compile`` the net's training forward (evaluation runs it eagerly).
        nonfinite: what a NaN/Inf loss does: ``stop`` the run with a message naming the step, the
            loss terms and the last good checkpoint; ``skip`` the batch and count it; ``off``.
            Non-finite weights always stop the run (an update with a non-finite gradient, learning
            rate or optimizer state made them: its loss was finite, so the batch is not the
            cause; a step fp16's GradScaler skips leaves them finite), and a checkpoint of them
            is never written; ``off`` checks none of these. ``stop`` costs no host sync per step:
            each step's loss terms stay on the device and are read, with the norm of the
            weights, every ``trainer.log_every_n_steps`` steps, at each epoch's last batch and
            before every checkpoint (the message names the step); ``skip`` syncs once per step.
        inference: test-time protocol ``(net_forward, image, align_corners=...) -> scores`` for
            validation and test (flip / multi-scale / sliding window, see
            ``lightning_modules.inference``; ``align_corners`` is the net's); None = one plain
            forward pass.
        mpa: what the logged and reported MPA averages, ``"recall"`` or ``"precision"``
            (``metrics.mpa``); both are logged as ``mRecall`` and ``mPrecision`` anyway.
        build_config: plain ``{"model", "eval", "data"}`` saved in every checkpoint as
            ``rimlab_config``, from which predict/export rebuild the net
            (:func:`experiments.keys.inference_config`); None: taken from a loaded checkpoint.
        prediction_writer: ``(stage, name, (H, W) uint8 ids) -> None``, handed every evaluated
            image's prediction at its original size (``save_predictions=true``); None: none.
        class_counts: ``() -> (pixel counts, region counts)``, each ``(C,)``, of the training
            set (e.g. ``datamodule.train_class_counts``), called once when the sampler gets its
            statistics at the start of fit: NRBS draws from them, and the expected kept share is
            reported from the pixel counts. None: no counts (NRBS then refuses to start).
    """

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        sampler: RegionalBalancedSampler | None = None,
        num_classes: int = 59,
        class_names: Sequence[str] | None = None,
        ignore_index: int = 255,
        freeze_encoder: bool = False,
        track_train_confusion: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        nonfinite: str = "stop",
        inference: Callable[..., Tensor] | None = None,
        mpa: str = "recall",
        build_config: dict[str, Any] | None = None,
        prediction_writer: Callable[[str, str, Any], None] | None = None,
        class_counts: Callable[[], tuple[Any, Any]] | None = None,
    ) -> None:
        super().__init__()
        self.mpa = check_mpa_definition(mpa, "module.mpa")
        if nonfinite not in ("stop", "skip", "off"):
            raise ValueError(f"nonfinite={nonfinite!r}: expected 'stop', 'skip' or 'off'")
        # Only plain values go into the checkpoint's hyper-parameters: partials do not unpickle
        # under torch.load(weights_only=True).
        self.save_hyperparameters(
            logger=False,
            ignore=[
                "net",
                "loss",
                "sampler",
                "optimizer",
                "scheduler",
                "inference",
                "build_config",
                "prediction_writer",
                "class_counts",
            ],
        )
        self.optimizer_factory = optimizer
        self.inference = inference
        self.scheduler_factory = scheduler
        self.net = net
        self.loss = loss
        self.sampler = sampler
        self.num_classes = int(num_classes)
        self.class_names = (
            list(class_names) if class_names else [str(i) for i in range(num_classes)]
        )
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} entries but num_classes is {num_classes}"
            )
        self.ignore_index = ignore_index
        if channels_last:
            # Weights as well as inputs: a convolution given NHWC input and NCHW weights runs
            # in one of them after a conversion, every step.
            net.to(memory_format=torch.channels_last)
        if freeze_encoder:
            net.freeze_encoder()
        # Outputs the loss does not weight (the auxiliary head in RIM stage 2) only cost time.
        self.frozen_heads = match_outputs_to_loss(net, loss)
        self.train_confmat = ConfusionMatrix(num_classes, ignore_index=ignore_index)
        self.val_confmat = ConfusionMatrix(num_classes, ignore_index=ignore_index)
        self.test_confmat = ConfusionMatrix(num_classes, ignore_index=ignore_index)
        self.track_train_confusion = track_train_confusion
        self.force_train_confusion = False
        # ARBS statistics of stage 1 (filled by the CPASnapshot callback); saved with every
        # checkpoint. The matrix, not a derived CPA vector, so that stage 2 chooses the reading.
        self.register_buffer(
            "early_confusion", torch.zeros((num_classes, num_classes), dtype=torch.int64)
        )
        self.register_buffer("early_cpa_epoch", torch.zeros((), dtype=torch.long))
        # Set when the weights came from a checkpoint that recorded only a CPA vector (older
        # rimlab): ARBS must refuse it rather than guess the matrix.
        self._legacy_early_cpa = False
        self.last_scores: dict[str, dict[str, Any]] = {}
        self.nonfinite = nonfinite
        self.skipped_nonfinite = 0
        self._last_losses: dict[str, Tensor] = {}
        # The per-step loss terms, kept on the device; the host reads them with the weights'
        # norm every trainer.log_every_n_steps steps (see _read_step_state).
        self._step_log = StepLog()
        self._weights_read_at: int | None = None  # global step of the last weights read
        self._trained_parameters: list[nn.Parameter] = []
        self._sampler_generator: torch.Generator | None = None
        self._progress: dict[str, float] = {}
        self.prediction_writer = prediction_writer
        self.build_config = build_config
        self.class_counts = class_counts
        # Kept out of the module tree so the compiled wrapper adds no duplicate state_dict keys.
        object.__setattr__(self, "_net_forward", torch.compile(net) if compile else net)

    # ------------------------------------------------------------------ forward

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # The loaders deliver uint8 images and masks (pinned, copied non-blocking by Lightning);
        # the normalisation and the int64 labels are made here, on the device.
        return network_batch(batch) if isinstance(batch, dict) else batch

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        """Logits of ``image`` ``(B, 3, h, w)``: ``{"out": (B, C, h, w), ...}``."""
        if self.hparams.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        # Evaluation runs the net eagerly: its input sizes vary (full-resolution validation, a
        # smaller last batch) and each new size, like each train/eval switch, would compile the
        # net again; training compiles once per stage.
        return (self._net_forward if self.training else self.net)(image)

    # ------------------------------------------------------------------ training

    def setup(self, stage: str) -> None:
        make_process_private(self)  # ddp_spawn shares the pickled tensors between processes

    def on_fit_start(self) -> None:
        if self.nonfinite == "skip" and self.trainer.world_size > 1:
            raise RuntimeError(
                "module.nonfinite=skip works in single-process runs only: under DDP a skipped "
                "batch on one rank would leave the others waiting in the gradient all-reduce; "
                "use module.nonfinite=stop"
            )
        self._step_log = StepLog()
        self._weights_read_at = None
        # Listed once: walking the module tree at every read costs more than the check itself.
        self._trained_parameters = [p for p in self.net.parameters() if p.requires_grad]
        if self.sampler is not None:
            if not self.sampler.is_ready:
                self._init_sampler()
            # Same probabilities everywhere, but each rank draws its own keep decisions.
            seed = int(torch.initial_seed()) + 1_000_003 * self.global_rank
            self._sampler_generator = torch.Generator(device=self.device).manual_seed(seed % 2**63)

    def on_fit_end(self) -> None:
        # Steps of a finished fit are not re-read by a later save (e.g. after trainer.test).
        self._step_log = StepLog()

    def reseed(self, seed: int) -> None:
        """Restarts the regional sampler's draws from ``seed`` (called by the EpochSeed callback)."""
        if self._sampler_generator is not None:
            self._sampler_generator.manual_seed(seed)

    def measure_train_confusion(self, on: bool) -> None:
        """Accumulates the training confusion matrix in this epoch (``on``) whatever
        ``track_train_confusion`` says (the ``CPASnapshot`` callback)."""
        self.force_train_confusion = on

    def record_early_confusion(self, epoch: int) -> Tensor:
        """Stores the training confusion matrix accumulated so far as that of ``epoch`` (1-based)
        in the checkpointed buffers ARBS reads; returns it ``(C, C)``."""
        confusion = self.train_confmat.compute()
        self.early_confusion.copy_(confusion.to(self.early_confusion))
        self.early_cpa_epoch.fill_(epoch)
        self.force_train_confusion = False
        return confusion

    def _init_sampler(self) -> None:
        sampler = self.sampler
        assert sampler is not None
        pixel_counts = region_counts = None
        if self.class_counts is not None:
            pixels, regions = self.class_counts()
            pixel_counts = torch.as_tensor(pixels, dtype=torch.float64)
            region_counts = torch.as_tensor(regions, dtype=torch.float64)
        if sampler.source == "arbs":
            confusion = self.early_confusion.detach().cpu()
            if int(confusion.sum()) == 0:
                raise RuntimeError(self._no_confusion_message())
        else:
            if pixel_counts is None:
                raise RuntimeError(
                    "sampler=nrbs needs the training set's class counts: build the module with "
                    "class_counts=datamodule.train_class_counts"
                )
            confusion = None
        stats = sampling_statistics(
            sampler.source,
            confusion=confusion,
            cpa=sampler.cpa,
            region_counts=region_counts,
            pixel_counts=pixel_counts,
            nrbs_count=sampler.nrbs_count,
        )
        sampler.set_statistics(stats.to(self.device), pixel_counts=pixel_counts)
        self._report_sampling()

    def _no_confusion_message(self) -> str:
        if self._legacy_early_cpa:
            return (
                "sampler=arbs needs the confusion matrix of the early stage-1 epoch, but this "
                "stage-1 checkpoint was written by an older rimlab that stored only a derived CPA "
                "vector (early_cpa), from which neither reading of the CPA (sampler.cpa=recall | "
                "precision) can be recovered. Retrain stage 1 (delete its folder under "
                "schedule.stage1_dir, or give another init_from)."
            )
        return (
            "sampler=arbs needs the confusion matrix recorded early in stage 1, but this model has "
            "none: start stage 2 from a stage-1 checkpoint of rimlab (schedule=rim, or "
            "init_from=<stage-1 ckpt> with callbacks.cpa_snapshot enabled)."
        )

    def sampling_report(self) -> dict[str, Any] | None:
        """The regional sampler's settings, statistics, keep probabilities and expected kept share.

        Returns:
            ``{"source", "cpa", "eta", "nrbs_count", "min_prob", "statistics": {class: x},
            "keep_probabilities": {class: s}, "expected_kept_share": float | None,
            "expected_kept_share_per_class": {class: s_i or None}, "kept_class_distribution":
            {class: share of the kept pixels}}``; None without a ready sampler.
        """
        sampler = self.sampler
        if sampler is None or not sampler.is_ready:
            return None
        names = self.class_names

        def per_class(values: Tensor) -> dict[str, float | None]:
            return {
                n: (float(v) if math.isfinite(float(v)) else None)
                for n, v in zip(names, values.detach().cpu().tolist(), strict=True)
            }

        report: dict[str, Any] = {
            "source": sampler.source,
            "cpa": sampler.cpa,
            "eta": sampler.eta,
            "nrbs_count": sampler.nrbs_count,
            "min_prob": sampler.min_prob,
            "statistics": per_class(sampler.stats),
            "keep_probabilities": per_class(sampler.probs),
            "expected_kept_share": None,
        }
        share = sampler.kept_share()
        if share is not None:
            overall, each, distribution = share
            report["expected_kept_share"] = overall if math.isfinite(overall) else None
            report["expected_kept_share_per_class"] = per_class(each)
            report["kept_class_distribution"] = per_class(distribution)
        return report

    def _report_sampling(self) -> None:
        """Prints, logs and warns about what the sampler will keep (at the start of stage 2)."""
        report = self.sampling_report()
        if report is None:
            return
        probs = self.sampler.probs.detach().cpu()
        share = report["expected_kept_share"]
        what = (
            f"CPA ({report['cpa']})"
            if report["source"] == "arbs"
            else f"training {report['nrbs_count']}"
        )
        log.info(
            "regional sampler %s from %s, eta=%s: keep probabilities min %.4f, mean %.4f over %d "
            "classes; expected kept share of the labelled training pixels %s",
            report["source"].upper(),
            what,
            report["eta"],
            float(probs.min()),
            float(probs.mean()),
            probs.numel(),
            "unknown (no training pixel counts)" if share is None else f"{100 * share:.2f}%",
        )
        each = report.get("expected_kept_share_per_class") or {}
        if each:
            rows = sorted(((v, n) for n, v in each.items() if v is not None), reverse=True)
            log.info(
                "expected kept share per class: %s",
                ", ".join(f"{n} {100 * v:.1f}%" for v, n in rows),
            )
        if float(probs.min()) >= 1.0:
            # e.g. an early model that recalls only the background: every other class has CPA 0,
            # eta = the background's CPA, and every class is kept: stage 2 then rebalances nothing.
            log.warning(
                "!!! the regional sampler keeps every class with probability 1: it rebalances "
                "nothing (%s statistic above 0 for %d of %d classes). For ARBS, a later "
                "schedule.cpa_epoch gives an early model that tells more classes apart.",
                report["source"].upper(),
                int((self.sampler.stats > 0).sum()),
                probs.numel(),
            )
        if share is not None and share < 0.01:
            log.warning(
                "!!! the regional sampler keeps only %.3f%% of the labelled training pixels in "
                "expectation (below 1%%): the main loss sees almost no data. Check sampler.eta "
                "(now %s), sampler.min_prob, or use sampler.nrbs_count=regions.",
                100 * share,
                report["eta"],
            )
        metrics = {
            f"sampler/keep_probability/{n}": v for n, v in report["keep_probabilities"].items()
        }
        if share is not None:
            metrics["sampler/expected_kept_share"] = share
        for logger in self.loggers:
            logger.log_metrics(
                {k: v for k, v in metrics.items() if v is not None}, step=self.global_step
            )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        image, target = batch["image"], batch["mask"]
        outputs = self(image)
        sample_mask = (
            self.sampler(target, generator=self._sampler_generator)
            if self.sampler is not None
            else None
        )
        extra = self.extra_loss_inputs(batch, outputs)
        losses = self.loss(outputs, target, sample_mask=sample_mask, **extra)
        if self.nonfinite == "skip" and not bool(torch.isfinite(losses["loss"])):
            # One host sync per step: a batch can only be skipped before its backward pass.
            self.skipped_nonfinite += 1
            log.warning(
                "step %d: non-finite loss, batch skipped (%d so far): %s",
                self.global_step,
                self.skipped_nonfinite,
                format_terms({k: float(v) for k, v in losses.items()}),
            )
            return None
        self._last_losses = {k: v.detach() for k, v in losses.items()}
        # loss/main is the same tensor as the main loss's own name (loss/ce, ...): logged once.
        names = tuple(k for k in losses if k != "loss/main")
        terms = stack_terms({k: losses[k] for k in names})  # (T,)
        self._step_log.add_terms(self.global_step, names, terms, image.shape[0])
        if self.track_train_confusion or self.force_train_confusion:
            self.train_confmat.update(outputs["out"].detach().argmax(1), target)
        return losses["loss"]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        read, log_now = read_points(self.trainer, batch_idx)
        if read:
            self._read_step_state(log=log_now)

    def read_step_state_now(self, batch_idx: int) -> None:
        """The read of :meth:`on_train_batch_end` at ``batch_idx``, made earlier by a callback
        whose work must never see the weights of a non-finite step (SCHP's average at a cycle's
        end: Lightning calls callbacks' batch-end hooks before the module's, whose read then
        finds nothing pending). Every rank calls it at the same batch (it may all_gather)."""
        _, log_now = read_points(self.trainer, batch_idx)
        self._read_step_state(log=log_now)

    def _read_step_state(self, log: bool, at_checkpoint: bool = False) -> None:
        """Reads the loss terms since the last read and the norm of the weights after the last
        update in one host transfer, raises on a non-finite loss or non-finite weights (under DDP
        after one ``all_gather`` of each rank's finding, so that every rank stops in the same step
        with the same message; :func:`~lightning_modules.step_state.read_step_log`), and with
        ``log`` writes the last step's terms as ``train/<term>_step``. ``at_checkpoint``: the read
        before a save (a message about the weights says that checkpoint was not written).

        Raises:
            NonFiniteLossError: naming the first non-finite step, its loss terms (those of the
                ranks whose loss was non-finite, under DDP) and the last good checkpoint.
            NonFiniteWeightsError: the losses were finite and the weights are not, naming the
                first non-finite parameters and the last good checkpoint.
        """
        step_log = self._step_log
        if not step_log.pending:
            return  # no training step in this process since the last read
        check = self.nonfinite != "off"
        last = step_log.last_step
        # Optimizer updates so far (None without a trainer): the weights are read once per update
        # (gradient accumulation reads several micro-batches of one update).
        updates = self.global_step if self._trainer is not None else None
        fresh = updates is None or updates != self._weights_read_at
        if check and last is not None and self._trained_parameters and fresh:
            # The weights after the update of the last step kept: one fused read of each weight
            # per read, where a gradient check would read every gradient in every step.
            weights = [p.detach() for p in self._trained_parameters]
            step_log.add_weights_norm(last, norm_sum(weights))
            self._weights_read_at = updates
        found = read_step_log(self, step_log, log=log, check=check)
        if found is not None:
            event, text = found
            if event.kind == LOSS:
                weights_bad = step_log.weights_finite is False
                raise NonFiniteLossError(self._nonfinite_message(event.step, text, weights_bad))
            message = nonfinite_weights_message(self, at_checkpoint=at_checkpoint) or (
                f"the weights' norm overflowed float32 at global step {self.global_step} (epoch "
                f"{self.current_epoch}): the weights diverge. Lower optimizer.lr or clip the "
                "gradients (trainer.gradient_clip_val)"
            )
            if self.skipped_nonfinite:
                message += (
                    f" ({self.skipped_nonfinite} batches with a non-finite loss were skipped "
                    "before: the weights may have made those losses non-finite)"
                )
            raise NonFiniteWeightsError(message)
        if check:
            self._check_loss_scale()
        if log:
            # The progress bar gets its loss as a host float (see progress_metrics).
            self._progress = {"train/loss_step": step_log.last["loss"]}

    def _check_loss_scale(self) -> None:
        """Under fp16 mixed precision, stops a run whose ``GradScaler`` skips every update.

        The scaler skips the update of a step with inf/NaN gradients and halves its scale, so the
        weights stay finite; an occasional skip is its normal working, but gradients that are
        non-finite at every step (a NaN from the backward pass itself) would skip every update
        for ever. A scale below fp16's smallest number (2^-24: from 2^16, 40 skips in a row)
        means that; read at a read point only (the queue is drained then).

        Raises:
            NonFiniteLossError: naming the scale and the last good checkpoint.
        """
        trainer = self._trainer
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return
        scale = float(scaler.get_scale())
        if scale >= FP16_SMALLEST:
            return
        good = self._good_checkpoint()
        raise NonFiniteLossError(
            f"fp16 loss scale {scale:.3g} at global step {self.global_step} (epoch "
            f"{self.current_epoch}): the GradScaler has skipped every recent update for "
            "non-finite gradients, so nothing trains (the losses were finite). The last good "
            f"checkpoint is {good or 'not saved yet'}. Check the model for a backward pass "
            "that gives NaN (e.g. sqrt or a norm at 0), or train with trainer.precision=bf16-mixed "
            "or 32-true."
        )

    def progress_metrics(self) -> dict[str, float]:
        """The progress bar's ``{"train/loss_step": loss}`` of the last logged step (empty before
        it), read by :class:`~lightning_modules.callbacks.StepMetricsProgressBar`."""
        return dict(self._progress)

    def extra_loss_inputs(
        self, batch: dict[str, Any], outputs: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """Keyword arguments added to the loss call of a training step (none here; SCHP adds its
        refined ``soft_target`` / ``soft_edge``)."""
        return {}

    def _good_checkpoint(self) -> str:
        return good_checkpoint(self._trainer)

    def _nonfinite_message(self, step: int, terms: str, weights_bad: bool = False) -> str:
        """The message of a non-finite loss at ``step``; ``weights_bad``: the weights read with
        it are non-finite too (this loss's own update, or an update before it, made them so)."""
        good = self._good_checkpoint()
        if weights_bad:
            cause = (
                "The weights are non-finite too at this read (they are read every "
                "trainer.log_every_n_steps steps): either this step's update carried its "
                "non-finite loss into them, or an update before it (a non-finite gradient, "
                "learning rate or optimizer state) made them so and this loss shows it. Check "
                "the batch's data, and lower the learning rate or clip the gradients "
                "(trainer.gradient_clip_val)."
            )
        else:
            cause = (
                "The weights were finite at the read: check this batch's data, or lower the "
                "learning rate; module.nonfinite=skip skips such batches instead."
            )
        return (
            f"non-finite loss at global step {step} (epoch {self.current_epoch}); "
            f"loss terms: {terms}. Nothing was written after this step; the "
            f"last good checkpoint (weights checked finite when it was written) is "
            f"{good or 'not saved yet'}. {cause}"
        )

    def _check_weights_finite(self) -> None:
        """Refuses to checkpoint non-finite weights (one host sync per checkpoint).

        The read before it (``on_save_checkpoint``) checks the trained weights when a step was
        kept since the last read; this checks every parameter (frozen ones too) at every save,
        also when nothing was pending.

        Raises:
            NonFiniteWeightsError: naming the first non-finite parameters and the last good
                checkpoint. Under DDP the weights, and so the decision, are the same on every rank.
        """
        if self.nonfinite == "off":
            return
        message = nonfinite_weights_message(self)
        if message is not None:
            raise NonFiniteWeightsError(message)

    def on_train_epoch_end(self) -> None:
        self._read_step_state(log=False)
        log_epoch_means(self, self._step_log, prog_bar=("loss",))
        if self.skipped_nonfinite:
            self.log("train/skipped_nonfinite", float(self.skipped_nonfinite))
        if self.track_train_confusion:
            self._log_scores("train", self.train_confmat, per_class=False)
        self.train_confmat.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.net.parameters() if p.requires_grad]
        return per_step_optimization(
            self.trainer, self.optimizer_factory, self.scheduler_factory, params
        )

    # ------------------------------------------------------------------ evaluation

    def predict_logits(self, image: Tensor) -> Tensor:
        """Scores ``(B, C, h, w)`` of ``image`` ``(B, 3, h, w)`` under the evaluation protocol
        (logits for a single pass, averaged probabilities for flip / multi-scale)."""
        if self.inference is None:
            return self(image)["out"]
        return self.inference(
            lambda x: self(x)["out"], image, align_corners=logits_align_corners(self.net)
        )

    def _eval_step(self, batch: dict[str, Any], metric: ConfusionMatrix, stage: str) -> None:
        """Scores a batch at the original label resolution.

        The protocol's scores (aligned with the network input, whatever flip / multi-scale /
        sliding-window runs made them) are resized to each image's ``orig_size``; when the batch
        has ``valid_box`` (``data.eval_keep_ratio``: the image was fitted into the input with its
        aspect ratio kept and padded) they are cropped to the box first
        (:func:`~lightning_modules.inference.scores_to_original`). When it has
        ``inverse_affine`` (``eval=schp_official``: SCHP's affine input) the scores are
        arg-maxed at the input size and the label map is warped back by nearest neighbour
        (:func:`~lightning_modules.inference.labels_to_original_affine`), SCHP's official
        scoring.
        """
        # Scored in float32, as predict scores: under bf16 autocast the logits arrive in bf16, and
        # resizing them in bf16 would round the differences the arg-max decides between.
        logits = self.predict_logits(batch["image"])
        with torch.autocast(logits.device.type, enabled=False):
            self._score_batch(logits.float(), batch, metric, stage)

    def _score_batch(
        self, logits: Tensor, batch: dict[str, Any], metric: ConfusionMatrix, stage: str
    ) -> None:
        """Scores ``(B, C, h, w)`` float32 ``logits`` of ``batch`` (see :meth:`_eval_step`).

        Every resize of the logits uses the net's ``align_corners`` (mmsegmentation resizes to
        the original image with its head's), False for most nets.
        """
        align_corners = logits_align_corners(self.net)
        target = batch["mask"]
        orig = batch.get("orig_size")
        boxes = batch.get("valid_box")
        affines = batch.get("inverse_affine")
        # The sizes and boxes slice the scores on the host: one transfer for both (a device
        # round trip per image before).
        orig, boxes = _host_values(orig, boxes)
        sizes = [tuple(target.shape[-2:])] * len(target) if orig is None else orig
        if (
            boxes is None
            and affines is None
            and all(tuple(s) == tuple(target.shape[-2:]) for s in sizes)
        ):
            # Every image has the (padded) label size: score the batch in one go.
            if logits.shape[-2:] != target.shape[-2:]:
                # (B, C, h, w) -> (B, C, H, W)
                logits = F.interpolate(
                    logits, size=target.shape[-2:], mode="bilinear", align_corners=align_corners
                )
            preds = logits.argmax(1)
            metric.update(preds, target)
            self._write_predictions(stage, batch, [p for p in preds])
            return
        input_size = tuple(batch["image"].shape[-2:])
        if affines is not None:
            if logits.shape[-2:] != input_size:
                # (B, C, h', w') -> (B, C, h, w): SCHP's net already returns the input size
                logits = F.interpolate(
                    logits, size=input_size, mode="bilinear", align_corners=False
                )
            # (B, C, h, w) -> (B, h, w): SCHP decides the labels at the input, not the original
            labels = logits.argmax(1)
        per_image = []
        for i, (h, w) in enumerate(sizes):
            if affines is not None:
                # (h, w) -> (1, H_i, W_i): nearest neighbour through the inverse affine
                pred = labels_to_original_affine(labels[i], affines[i], (h, w))[None]
            else:
                # (1, C, h', w') -> (1, C, H_i, W_i): score at the image's original resolution
                up = scores_to_original(
                    logits[i : i + 1],
                    (h, w),
                    valid_box=None if boxes is None else boxes[i],
                    input_size=input_size,
                    align_corners=align_corners,
                )
                pred = up.argmax(1)
            metric.update(pred, target[i : i + 1, :h, :w])
            per_image.append(pred[0])
        self._write_predictions(stage, batch, per_image)

    def _write_predictions(self, stage: str, batch: dict[str, Any], preds: list[Tensor]) -> None:
        """Hands each image's ``(H, W)`` predicted ids to ``prediction_writer``, when one is set."""
        if self.prediction_writer is None:
            return
        for name, pred in zip(batch["name"], preds, strict=True):
            self.prediction_writer(stage, name, pred.to(torch.uint8).cpu().numpy())

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.val_confmat, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val", self.val_confmat, per_class=True)
        self.val_confmat.reset()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.test_confmat, "test")

    def on_test_epoch_end(self) -> None:
        self._log_scores("test", self.test_confmat, per_class=True)
        self.test_confmat.reset()

    def _log_scores(self, stage: str, metric: ConfusionMatrix, per_class: bool) -> None:
        if metric.update_count == 0:
            # e.g. the end of the epoch a resumed run restarts at: nothing was seen in this
            # process (and so in none, since every rank runs the same loop state).
            return
        confusion = metric.compute()
        if int(confusion.sum()) == 0:
            return
        scores = segmentation_scores(confusion, self.mpa)
        scores["confusion"] = confusion.detach().cpu()
        scores["epoch"] = self.current_epoch
        scores["global_step"] = self.global_step
        self.last_scores[stage] = scores
        # MPA is logged under the name of its reading (val/MPA_recall): no column is a bare "MPA".
        for key in ("PA", "MPA", "mIoU", "mAcc", "mPrecision", "mRecall"):
            value = scores[key]
            name = f"MPA_{self.mpa}" if key == "MPA" else key
            self.log(
                f"{stage}/{name}",
                float(value) if math.isfinite(value) else 0.0,
                prog_bar=key == "mIoU" and stage == "val",
                sync_dist=False,
            )
        if per_class and not self.trainer.sanity_checking:
            for i, name in enumerate(self.class_names):
                iou = float(scores["IoU"][i])
                if math.isfinite(iou):
                    self.log(f"{stage}/IoU/{name}", iou)

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Before anything is written (this hook runs inside every trainer.save_checkpoint, on
        # every rank), so that no checkpoint file ever holds non-finite weights: first the steps
        # since the last read, then the weights themselves.
        self._read_step_state(log=False, at_checkpoint=True)
        self._check_weights_finite()
        # The net is not a hyper-parameter (see save_hyperparameters above): its resolved config
        # travels under its own key so that predict/export can rebuild it from the file alone.
        if self.build_config is not None:
            checkpoint["rimlab_config"] = self.build_config
        checkpoint["rimlab_augmentation"] = AUGMENTATION_VERSION

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict")
        if isinstance(state, dict):
            self._upgrade_legacy_state(state)
        if self.build_config is None:
            self.build_config = checkpoint.get("rimlab_config")
        version = checkpoint.get("rimlab_augmentation", 1)
        if version != AUGMENTATION_VERSION:
            # Resuming is still correct training, only no longer a replay of an unbroken run.
            log.warning(
                "this checkpoint was trained with augmentation draws of version %s (now %s): the "
                "resumed epochs draw other augmentations than an uninterrupted run would have",
                version,
                AUGMENTATION_VERSION,
            )

    def load_init_weights(self, path: str) -> None:
        """Loads the net weights (and the ARBS statistics) of a checkpoint, nothing of its training state.

        Args:
            path: a rimlab Lightning checkpoint (``.ckpt``), a published SCHP ``.pth`` or an
                mmsegmentation checkpoint (each detected by its layout; mapped by
                ``lightning_modules.official_weights`` / ``lightning_modules.mmseg_weights``).

        Raises:
            CheckpointError: the file is missing, unreadable, of another format, or its network
                does not match the configured one.
        """
        ckpt = read_checkpoint(path)
        official = official_weights.official_state_dict(ckpt)
        if official is not None:
            self.net.load_state_dict(official_weights.map_official_state(official, self.net, path))
            return
        mmseg = mmseg_weights.mmseg_state_dict(ckpt)
        if mmseg is not None:
            self.net.load_state_dict(mmseg_weights.map_mmseg_state(mmseg, self.net, path))
            return
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
        state = ckpt["state_dict"]
        own = self.state_dict()
        net_keys = [k for k in own if k.startswith("net.")]
        missing = [k for k in net_keys if k not in state]
        if missing:
            raise CheckpointError(
                f"{path}: the checkpoint's network does not match the configured model "
                f"({len(missing)} missing weights, e.g. {missing[:3]})"
            )
        wrong = [k for k in net_keys if state[k].shape != own[k].shape]
        if wrong:
            k = wrong[0]
            raise CheckpointError(
                f"{path}: weight {k} has shape {tuple(state[k].shape)} in the checkpoint but "
                f"{tuple(own[k].shape)} in the model (different model.num_classes or backbone?)"
            )
        self._upgrade_legacy_state(state)
        keep = {
            k: v
            for k, v in state.items()
            if k.startswith("net.") or k in ("early_confusion", "early_cpa_epoch")
        }
        self.load_state_dict(keep, strict=False)

    def _upgrade_legacy_state(self, state: dict[str, Tensor]) -> None:
        """Lets a state dict of an older rimlab (``early_cpa`` vector, no ``early_confusion``) load.

        The matrix it lacks is left empty and the module remembers why, so that ARBS refuses it
        with a message instead of guessing; everything else (resuming, the baseline, NRBS, ILM)
        works as before.
        """
        if "early_confusion" in state:
            return
        legacy = state.pop("early_cpa", None)
        state["early_confusion"] = torch.zeros_like(self.early_confusion)
        if legacy is not None and bool(torch.isfinite(legacy).any()):
            self._legacy_early_cpa = True
