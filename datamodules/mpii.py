"""MPII Human Pose (16 joints): the per-person Dataset and the LightningDataModule of DeepPose
cascades.

Read ``../shared/DATASETS.md`` section 5. The annotation files are read by
:mod:`datamodules.mpii_annotations` (its docstring gives the coordinate conventions); the person
and joint crops are :class:`datamodules.pose_transforms.PersonCrop` and
:class:`~datamodules.pose_transforms.JointCrops`.

Raw item (``transform=None``): ``image`` (H, W, 3) uint8, ``keypoints`` (16, 3) float32 (x, y,
labelled), ``visible`` (16,) float32 (the file's ``is_visible``; 1 when missing), ``head_size``
float (NaN without a head box), ``center`` (2,) float32, ``scale`` float, ``name`` str, ``index``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from datamodules.base import read_image, split_loader
from datamodules.batch import DatasetError
from datamodules.mpii_annotations import (
    JSON_NAMES,
    MAT_NAME,
    find_annotation,
    load_json_annotations,
    load_release_mat,
)
from datamodules.pose_transforms import (
    MPII_FLIP_PAIRS,
    MPII_JOINTS,
    NUM_JOINTS,
    JointCrops,
    PersonCrop,
    torso_diameter,
)

log = logging.getLogger(__name__)


class MPIIDataset(Dataset):
    """One split of MPII, one item per person (see the module docstring for the raw item).

    Args:
        root: folder with ``images/`` and the annotations (directly or in ``annotations/``).
        split: ``train``, ``val`` (Tompson's 2,958 persons, json + ``mpii_gt_val.mat``), ``test``,
            or ``trainval`` (json only).
        format: ``mat`` (official ``RELEASE`` file; ``val`` still comes from the json files, and
            ``train`` then leaves out every image that holds a val person), ``json``, or ``auto``
            (the .mat when present).
        transform: callable on the raw item (``transform(item, seed=...)`` when the sampler gives a
            seed); None returns the raw item.
        image_dir: image folder (default ``root/images``).
        single_person: keep only the ``single_person`` rects of the .mat.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        format: str = "auto",
        transform: Any | None = None,
        image_dir: str | Path | None = None,
        single_person: bool = False,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.image_dir = Path(image_dir) if image_dir is not None else self.root / "images"
        self.skipped: Counter = Counter()
        mat_path = find_annotation(self.root, (MAT_NAME,))
        if format == "auto":
            format = "mat" if mat_path is not None and split in ("train", "test") else "json"
        if format not in ("mat", "json"):
            raise ValueError(f"format={format!r}: expected 'mat', 'json' or 'auto'")
        self.format = format
        if format == "mat" and split in ("train", "test"):
            if mat_path is None:
                raise DatasetError(self.root, f"{MAT_NAME} not found")
            self.source = mat_path
            records, self.skipped = load_release_mat(mat_path)
            self.records = records[split]
            if single_person:
                self.records = [r for r in self.records if r["single_person"]]
            if split == "train":
                self.records = self._without_val_images(self.records)
        else:
            if split not in JSON_NAMES:
                raise ValueError(f"split={split!r}: expected one of {sorted(JSON_NAMES)}")
            path = find_annotation(self.root, JSON_NAMES[split])
            if path is None:
                raise DatasetError(self.root, f"{JSON_NAMES[split][0]} not found")
            self.source = path
            gt = find_annotation(self.root, ("mpii_gt_val.mat", "gt_valid.mat"))
            if split == "val" and gt is None:
                raise DatasetError(
                    self.root, "mpii_gt_val.mat not found: val head sizes come from it"
                )
            self.records = load_json_annotations(
                path, gt if split == "val" else None, skipped=self.skipped
            )
        if self.skipped:
            log.info(
                "MPII %s (%s): skipped %s",
                split,
                self.source.name,
                ", ".join(f"{n} x {why}" for why, n in sorted(self.skipped.items())),
            )
        if not self.records:
            raise DatasetError(self.source, f"split '{split}' has no usable person")
        self.has_labels = split != "test"

    def _without_val_images(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # HRNet/bearpaw: train leaves out every person of an image holding a val person.
        val_json = find_annotation(self.root, JSON_NAMES["val"])
        if val_json is None:
            log.warning(
                "MPII train from %s: no mpii_val.json, so val images are not excluded", MAT_NAME
            )
            return records
        val_images = {r["name"] for r in load_json_annotations(val_json)}
        kept = [r for r in records if r["name"] not in val_images]
        self.skipped["train: image holds a val person"] += len(records) - len(kept)
        return kept

    def __len__(self) -> int:
        return len(self.records)

    def annotation(self, index: int) -> dict[str, Any]:
        """The record of person ``index`` without its image."""
        rec = self.records[index]
        return {
            "keypoints": rec["keypoints"].copy(),
            "visible": rec["visible"].copy(),
            "head_size": float(rec["head_size"]),
            "center": rec["center"].copy(),
            "scale": float(rec["scale"]),
            "name": rec["name"],
            "index": int(index),
        }

    def load(self, index: int) -> dict[str, Any]:
        """Raw item ``index`` (image decoded)."""
        item = self.annotation(index)
        item["image"] = read_image(self.image_dir / item["name"])
        return item

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = index if isinstance(index, tuple) else (index, None)
        item = self.load(index)
        if self.transform is None:
            return item
        return self.transform(item) if seed is None else self.transform(item, seed=seed)

    def arrays(self) -> dict[str, np.ndarray]:
        """All annotations stacked: ``keypoints`` (N, 16, 3), ``head_size`` (N,), ``center``
        (N, 2), ``scale`` (N,)."""
        return {
            "keypoints": np.stack([r["keypoints"] for r in self.records]),
            "head_size": np.array([r["head_size"] for r in self.records], np.float64),
            "center": np.stack([r["center"] for r in self.records]).astype(np.float64),
            "scale": np.array([r["scale"] for r in self.records], np.float64),
        }


class _Subset(Dataset):
    """Persons ``indices`` of a dataset (items keep their original ``index``)."""

    def __init__(self, dataset: MPIIDataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int | tuple[int, int]) -> dict[str, Any]:
        i, seed = i if isinstance(i, tuple) else (i, None)
        j = self.indices[i]
        return self.dataset[j] if seed is None else self.dataset[(j, seed)]


# -- the datamodule ---------------------------------------------------------------------------------


class MPIIDataModule(LightningDataModule):
    """MPII for a DeepPose cascade: person crops for stage 1, joint crops for stages >= 2.

    The cascade driver calls :meth:`configure_stage` before each stage's fit; :meth:`predict_loader`
    serves the un-augmented crops the driver runs the cascade on.

    Args:
        root: the MPII folder (``images/`` + annotations), or where the synthetic set goes.
        format: ``auto`` | ``mat`` | ``json`` (see :class:`MPIIDataset`).
        batch_size: persons per training batch (a stage >= 2 batch holds 16 crops per person).
        eval_batch_size: persons per evaluation batch (default ``batch_size``).
        num_workers, pin_memory, persistent_workers: DataLoader settings.
        input_size: crop side S (the stage's network input; the driver sets it per stage).
        center_shift, enlarge: the person box (+shift * scale px down, 200 * scale * enlarge side).
        scale_jitter, rotate, rotate_prob, flip, translate, noise, jitter: stage-1 augmentation
            (:class:`PersonCrop`).
        sigma: stage >= 2 crop side / diam (the driver sets it per stage).
        min_diam: lower bound of diam / person-box side.
        single_person: keep only the .mat's ``single_person`` rects.
        synthetic: keyword arguments of :func:`datamodules.synthetic_mpii.ensure_synthetic_mpii`;
            when given, ``prepare_data`` generates a synthetic set in the json form under ``root``.
        num_joints, joint_names, flip_pairs: the skeleton (MPII's).
    """

    def __init__(
        self,
        root: str,
        format: str = "auto",
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = False,
        input_size: int = 220,
        center_shift: float = 15.0,
        enlarge: float = 1.25,
        scale_jitter: float = 0.25,
        rotate: float = 30.0,
        rotate_prob: float = 0.6,
        flip: bool = True,
        translate: float = 0.0,
        noise: float = 0.0,
        jitter: str = "uniform",
        sigma: float = 1.0,
        min_diam: float = 0.1,
        single_person: bool = False,
        synthetic: dict[str, Any] | None = None,
        num_joints: int = NUM_JOINTS,
        joint_names: Sequence[str] = MPII_JOINTS,
        flip_pairs: Sequence[Sequence[int]] = MPII_FLIP_PAIRS,
    ) -> None:
        super().__init__()
        if int(num_joints) != NUM_JOINTS:
            raise ValueError(f"num_joints={num_joints}: MPII has {NUM_JOINTS}")
        self.root = Path(root)
        self.format = format
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.input_size = int(input_size)
        self.center_shift, self.enlarge = float(center_shift), float(enlarge)
        self.scale_jitter, self.rotate = float(scale_jitter), float(rotate)
        self.rotate_prob = float(rotate_prob)
        self.translate, self.noise, self.jitter = float(translate), float(noise), str(jitter)
        self.flip_pairs = [tuple(int(v) for v in p) for p in flip_pairs] if flip else []
        self.all_flip_pairs = [tuple(int(v) for v in p) for p in flip_pairs]
        self.sigma, self.min_diam = float(sigma), float(min_diam)
        self.single_person = bool(single_person)
        self.synthetic = dict(synthetic) if synthetic is not None else None
        self.joint_names = list(joint_names)
        self.stage = 1
        self.displacement: tuple[np.ndarray, np.ndarray] | None = None
        self.val_centers: np.ndarray | None = None
        self._datasets: dict[str, MPIIDataset] = {}

    # -- data on disk

    def prepare_data(self) -> None:
        if self.synthetic is not None:
            from datamodules.synthetic_mpii import ensure_synthetic_mpii

            ensure_synthetic_mpii(self.root, **self.synthetic)

    def dataset(self, split: str) -> MPIIDataset:
        """The raw dataset of ``split`` (built once)."""
        if split not in self._datasets:
            self.prepare_data()
            self._datasets[split] = MPIIDataset(
                self.root, split, format=self.format, single_person=self.single_person
            )
        return self._datasets[split]

    def diam_ratio(self, split: str = "train") -> float:
        """Median torso diameter / person-box side over ``split`` (the diam fallback)."""
        a = self.dataset(split).arrays()
        diam = torso_diameter(a["keypoints"][..., :2], a["keypoints"][..., 2])
        side = 200.0 * a["scale"] * self.enlarge
        ratio = diam / side
        ratio = ratio[np.isfinite(ratio)]
        return float(np.median(ratio)) if len(ratio) else 0.3

    # -- stages

    def set_stage_options(
        self,
        batch_size: int | None = None,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        scale_jitter: float | None = None,
        rotate: float | None = None,
        rotate_prob: float | None = None,
        flip: bool | None = None,
        min_diam: float | None = None,
        translate: float | None = None,
        noise: float | None = None,
        jitter: str | None = None,
    ) -> None:
        """Loader and augmentation settings of one cascade stage (the constructor's meaning;
        None keeps the current value, an ``eval_batch_size`` of None follows ``batch_size``)."""
        given = {
            "batch_size": (batch_size, int),
            "num_workers": (num_workers, int),
            "scale_jitter": (scale_jitter, float),
            "rotate": (rotate, float),
            "rotate_prob": (rotate_prob, float),
            "min_diam": (min_diam, float),
            "translate": (translate, float),
            "noise": (noise, float),
            "jitter": (jitter, str),
        }
        for name, (value, kind) in given.items():
            if value is not None:
                setattr(self, name, kind(value))
        self.eval_batch_size = int(eval_batch_size or self.batch_size)
        if flip is not None:
            self.flip_pairs = list(self.all_flip_pairs) if flip else []

    def configure_stage(
        self,
        stage: int,
        input_size: int | None = None,
        sigma: float | None = None,
        displacement: tuple[np.ndarray, np.ndarray] | None = None,
        val_centers: np.ndarray | None = None,
    ) -> None:
        """Serve stage ``stage``: person crops (1) or joint crops around simulated (train) and
        given (val, (N_val, K, 2) image pixels) previous estimates (>= 2)."""
        if stage >= 2 and (displacement is None or val_centers is None):
            raise ValueError("stages >= 2 need the displacement statistics and val_centers")
        self.stage = int(stage)
        if input_size is not None:
            self.input_size = int(input_size)
        if sigma is not None:
            self.sigma = float(sigma)
        self.displacement, self.val_centers = displacement, val_centers

    def person_transform(self, train: bool) -> PersonCrop:
        return PersonCrop(
            self.input_size,
            self.center_shift,
            self.enlarge,
            train=train,
            scale_jitter=self.scale_jitter,
            rotate=self.rotate,
            rotate_prob=self.rotate_prob,
            flip_pairs=self.flip_pairs,
            translate=self.translate,
            noise=self.noise,
            jitter=self.jitter,
        )

    def joint_transform(
        self,
        displacement: tuple[np.ndarray, np.ndarray] | None = None,
        centers: np.ndarray | None = None,
        split: str = "train",
    ) -> JointCrops:
        return JointCrops(
            self.input_size,
            self.sigma,
            self.center_shift,
            self.enlarge,
            displacement=displacement,
            centers=centers,
            diam_ratio=self.diam_ratio(split) if displacement is not None else 0.3,
            min_diam=self.min_diam,
            flip_pairs=self.flip_pairs,
        )

    # -- loaders

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        return split_loader(dataset, train, self)

    def _stage_dataset(self, split: str, train: bool) -> MPIIDataset:
        base = self.dataset(split)
        ds = MPIIDataset.__new__(MPIIDataset)
        ds.__dict__.update(base.__dict__)  # shares the records; only the transform differs
        if self.stage == 1:
            ds.transform = self.person_transform(train)
        elif train:
            ds.transform = self.joint_transform(displacement=self.displacement, split=split)
        else:
            ds.transform = self.joint_transform(centers=self.val_centers, split=split)
        return ds

    def train_dataloader(self) -> DataLoader:
        ds = self._stage_dataset("train", train=True)
        if len(ds) < self.batch_size:
            raise ValueError(
                f"train has {len(ds)} persons, fewer than batch_size={self.batch_size}"
            )
        return self._loader(ds, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._stage_dataset("val", train=False), train=False)

    def predict_loader(
        self,
        split: str,
        centers: np.ndarray | None = None,
        indices: Sequence[int] | None = None,
        input_size: int | None = None,
        sigma: float | None = None,
    ) -> DataLoader:
        """Un-augmented crops of ``split`` for running the cascade: person crops when ``centers``
        is None, else joint crops on ``centers`` ((N, K, 2), indexed like the dataset).

        Args:
            indices: only these persons (e.g. the training persons whose errors are measured).
        """
        base = self.dataset(split)
        size = int(input_size or self.input_size)
        if centers is None:
            transform = PersonCrop(size, self.center_shift, self.enlarge, train=False)
        else:
            transform = JointCrops(
                size,
                float(sigma if sigma is not None else self.sigma),
                self.center_shift,
                self.enlarge,
                centers=centers,
                min_diam=self.min_diam,
            )
        ds = MPIIDataset.__new__(MPIIDataset)
        ds.__dict__.update(base.__dict__)
        ds.transform = transform
        dataset: Dataset = ds if indices is None else _Subset(ds, indices)
        return self._loader(dataset, train=False)
