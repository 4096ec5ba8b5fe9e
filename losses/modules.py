"""``nn.Module`` wrappers around ``losses.functional`` and the composite parsing loss.

The wrappers hold only hyper-parameters (built by Hydra from ``conf/loss/*.yaml``, keys equal the
constructor arguments). Each carries a short ``name`` that ``ParsingLoss`` uses to label its term
in the logged dict (``loss/ce``, ``loss/focal``, ``loss/ilm``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from losses import functional as LF

__all__ = ["CrossEntropyLoss", "FocalLoss", "InterClassLoss", "ParsingLoss"]

#: ``ParsingLoss(main_normalizer=...)``: what divides the main loss summed over the kept pixels.
MAIN_NORMALIZERS = ("labelled", "kept")
#: ``ParsingLoss(side_target=...)``: what the side outputs (DANet's pam/cam) are scored against.
SIDE_TARGETS = ("sampled", "full", "off")


class CrossEntropyLoss(nn.Module):
    """Pixel-wise cross-entropy averaged over labelled pixels (0, not NaN, when there are none).

    Args:
        ignore_index: label value of unlabelled pixels.
        label_smoothing: as in ``F.cross_entropy``.
    """

    name = "ce"

    def __init__(self, ignore_index: int = 255, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Loss of ``(B, C, H, W)`` logits against a ``(B, H, W)`` target; a float32 scalar."""
        return LF.cross_entropy(logits, target, self.ignore_index, self.label_smoothing)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}"


class FocalLoss(nn.Module):
    """Multi-class focal loss averaged over labelled pixels; see ``functional.focal_loss``.

    Args:
        gamma: focusing parameter (0 gives the cross-entropy).
        alpha: optional per-class weights ``(C,)`` or a single float.
        ignore_index: label value of unlabelled pixels.
    """

    name = "focal"

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | None = None,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        self.gamma = gamma
        self.ignore_index = ignore_index
        self.alpha: float | None = None
        if alpha is None or isinstance(alpha, (int, float)):
            self.alpha = None if alpha is None else float(alpha)
            self.register_buffer("class_weights", None)
        else:
            # A buffer follows the module across devices; not persistent because it is
            # configuration, not learned state (checkpoints stay loadable if the config changes).
            weights = torch.as_tensor(list(alpha), dtype=torch.float32)
            self.register_buffer("class_weights", weights, persistent=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Loss of ``(B, C, H, W)`` logits against a ``(B, H, W)`` target; a float32 scalar."""
        alpha = self.class_weights if self.class_weights is not None else self.alpha
        return LF.focal_loss(logits, target, self.gamma, alpha, self.ignore_index)

    def extra_repr(self) -> str:
        alpha = self.alpha if self.class_weights is None else "per-class"
        return f"gamma={self.gamma}, alpha={alpha}, ignore_index={self.ignore_index}"


class InterClassLoss(nn.Module):
    """RIM's inter-class loss module (ILM); see ``functional.inter_class_loss``.

    Args:
        margin: required gap between the true class score and every other class score.
        ignore_index: label value of unlabelled pixels.
    """

    name = "ilm"

    def __init__(self, margin: float = 1.0, ignore_index: int = 255) -> None:
        super().__init__()
        self.margin = margin
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, target: Tensor, valid_mask: Tensor | None = None) -> Tensor:
        """Loss of ``(B, C, H, W)`` logits against a ``(B, H, W)`` target.

        ``valid_mask`` ``(B, H, W)`` bool, if given, restricts the loss to the pixels where it is
        True. Returns a float32 scalar.
        """
        return LF.inter_class_loss(logits, target, self.margin, self.ignore_index, valid_mask)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, ignore_index={self.ignore_index}"


class ParsingLoss(nn.Module):
    """Main + auxiliary + inter-class loss of a parsing network (RIM eq. 8 plus deep supervision).

    ``L = L_main + aux_weight * L_aux + ilm_weight * L_ilm``, where

    - ``L_main`` is ``main`` on ``outputs["out"]``. With a regional sampler's ``sample_mask`` only
      the sampled class regions are learnt from: the paper's ``L_RBS`` (eq. 1). ``main`` is a
      mean over the pixels it scores; ``main_normalizer`` says which pixels divide the sum over
      the kept ones. ``"labelled"`` (default): every labelled pixel of the batch, as when the
      prediction and the label are multiplied by the sampling mask before a mean cross-entropy
      (section 3.1): dropped pixels stay in the denominator with zero loss. ``"kept"``: only the
      kept pixels, which scales the main term by ``N_labelled / N_kept`` (about 5x at a 20% kept
      share) and so changes its balance with the ILM from batch to batch.
    - ``L_aux`` is the same criterion on ``outputs["aux"]`` (when present and ``aux_weight > 0``),
      always against the *full* target: the auxiliary head is a deep-supervision term on the
      natural data distribution; the paper rebalances (and defines ``L_RBS`` for) the main
      prediction only.
    - Side outputs named in ``side_outputs`` (DANet's position- and channel-attention logits
      ``"pam"``/``"cam"``, present only in training) add ``side_weight`` x the same criterion, as
      in the DANet paper. ``side_target="sampled"`` (default) scores them like the main term
      (the sampled regions, the same normaliser), so with a sampler every decoder output learns
      from the rebalanced data, as eq. 8 has only ``L_RBS + lambda L_inter``; ``"full"`` scores
      them against the full target; ``"off"`` drops them (their heads are then frozen, see
      ``lightning_modules.parsing.match_outputs_to_loss``). Without a sampler ``"sampled"`` and
      ``"full"`` are the same.
    - ``L_ilm`` is ``ilm`` on ``outputs["out"]`` (when ``ilm`` is given). With ``ilm_region="all"``
      (the default) it sees every labelled pixel; with ``"sampled"`` only the pixels inside
      ``sample_mask`` (all labelled pixels if no mask is passed).

    Args:
        main: main criterion, called as ``main(logits, target)``; its ``name`` attribute (e.g.
            ``"ce"``, ``"focal"``) labels its term.
        aux_weight: weight of the auxiliary term; 0 disables it.
        ilm: optional inter-class criterion, called as ``ilm(logits, target, valid_mask=...)``.
        ilm_weight: the paper's lambda.
        ilm_region: ``"all"`` or ``"sampled"``, see above.
        ignore_index: label value written outside ``sample_mask``; must match ``main``'s.
        side_outputs: output keys scored as side terms (when the net returns them).
        side_weight: weight of each side term; 0 disables them.
        main_normalizer: ``"labelled"`` or ``"kept"``, see above.
        side_target: ``"sampled"``, ``"full"`` or ``"off"``, see above.
    """

    def __init__(
        self,
        main: nn.Module,
        aux_weight: float = 0.4,
        ilm: nn.Module | None = None,
        ilm_weight: float = 1.0,
        ilm_region: str = "all",
        ignore_index: int = 255,
        side_outputs: Sequence[str] = ("pam", "cam"),
        side_weight: float = 1.0,
        main_normalizer: str = "labelled",
        side_target: str = "sampled",
    ) -> None:
        super().__init__()
        if ilm_region not in ("all", "sampled"):
            raise ValueError(f"loss.ilm_region={ilm_region!r}: expected 'all' or 'sampled'")
        if main_normalizer not in MAIN_NORMALIZERS:
            raise ValueError(
                f"loss.main_normalizer={main_normalizer!r}: expected one of "
                f"{', '.join(MAIN_NORMALIZERS)}"
            )
        if side_target not in SIDE_TARGETS:
            raise ValueError(
                f"loss.side_target={side_target!r}: expected one of {', '.join(SIDE_TARGETS)}"
            )
        main_ignore = getattr(main, "ignore_index", ignore_index)
        if main_ignore != ignore_index:
            # Otherwise the pixels outside sample_mask would be scored as a real class.
            raise ValueError(f"main.ignore_index={main_ignore} differs from {ignore_index}")
        self.main = main
        self.aux_weight = aux_weight
        self.ilm = ilm
        self.ilm_weight = ilm_weight
        self.ilm_region = ilm_region
        self.ignore_index = ignore_index
        self.main_name = str(getattr(main, "name", "main"))
        self.side_outputs = tuple(side_outputs)
        self.side_weight = side_weight
        self.main_normalizer = main_normalizer
        self.side_target = side_target

    def scored_outputs(self) -> set[str]:
        """The training-only outputs this loss weights: ``"aux"`` when ``aux_weight > 0``, the
        ``side_outputs`` when ``side_weight > 0`` and ``side_target`` is not ``"off"``."""
        scored = {"aux"} if self.aux_weight > 0 else set()
        if self.side_weight > 0 and self.side_target != "off":
            scored.update(self.side_outputs)
        return scored

    def forward(
        self,
        outputs: Mapping[str, Tensor],
        target: Tensor,
        sample_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Compute the total loss and its named terms.

        Args:
            outputs: ``{"out": (B, C, H, W) logits, "aux": (B, C, H, W) logits (optional)}`` at
                the target's resolution.
            target: ``(B, H, W)`` int64 class ids, ``ignore_index`` for unlabelled pixels.
            sample_mask: optional ``(B, H, W)`` bool mask of the regional sampler.

        Returns:
            ``{"loss": total, "loss/main": L_main, "loss/<main name>": L_main (alias),
            "loss/aux": L_aux, "loss/ilm": L_ilm}``; the last two only when those terms are active.
            Only ``"loss"`` is meant to be optimised; the others are for logging.
        """
        logits = outputs["out"]
        main_target = target
        scale: Tensor | None = None
        if sample_mask is not None:
            main_target = target.masked_fill(~sample_mask.to(torch.bool), self.ignore_index)
            if self.main_normalizer == "labelled":
                # main() is a mean over the kept pixels: rescale it to a mean over every labelled
                # pixel (sum over kept / N_labelled), on the device, without a host sync.
                kept = (main_target != self.ignore_index).sum()
                labelled = (target != self.ignore_index).sum().clamp(min=1)
                scale = kept.float() / labelled.float()
        main = self._score(logits, main_target, scale)
        terms: dict[str, Tensor] = {"loss/main": main}
        if self.main_name != "main":
            terms[f"loss/{self.main_name}"] = main
        total = main

        scored = self.scored_outputs()
        aux_logits = outputs.get("aux")
        if aux_logits is not None and "aux" in scored:
            aux = self.main(aux_logits, target)
            terms["loss/aux"] = aux
            total = total + self.aux_weight * aux

        for key in self.side_outputs:
            if key in scored and key in outputs:
                if self.side_target == "sampled":
                    side = self._score(outputs[key], main_target, scale)
                else:
                    side = self.main(outputs[key], target)
                terms[f"loss/{key}"] = side
                total = total + self.side_weight * side

        if self.ilm is not None:
            region = sample_mask if self.ilm_region == "sampled" else None
            ilm = self.ilm(logits, target, valid_mask=region)
            terms["loss/ilm"] = ilm
            total = total + self.ilm_weight * ilm

        return {"loss": total, **terms}

    def _score(self, logits: Tensor, target: Tensor, scale: Tensor | None) -> Tensor:
        """``main(logits, target)``, times ``scale`` (the kept-to-labelled ratio) when given."""
        value = self.main(logits, target)
        return value if scale is None else value * scale

    def extra_repr(self) -> str:
        return (
            f"aux_weight={self.aux_weight}, ilm_weight={self.ilm_weight}, "
            f"ilm_region={self.ilm_region!r}, ignore_index={self.ignore_index}, "
            f"main_normalizer={self.main_normalizer!r}, side_target={self.side_target!r}"
        )
