"""The predict command: images, folders and videos parsed from a checkpoint alone."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cfg_utils import SINGLE, TINY, compose_cfg
from hydra.errors import ConfigCompositionException
from PIL import Image

from experiments.build import build_module
from experiments.predict import PredictError, load_parser, main
from lightning_modules.checkpoint_io import CheckpointError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _checkpoint(module, path):
    """A checkpoint as Lightning writes it (state_dict, hyper_parameters, on_save_checkpoint)."""
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A lite PSPNet with non-trivial BatchNorm statistics, its module and its checkpoint."""
    tmp = tmp_path_factory.mktemp("predict")
    cfg = compose_cfg(
        ["experiment=quickstart", *TINY, *SINGLE, "data.eval_size=[40,48]"], tmp, tmp / "data"
    )
    torch.manual_seed(0)
    module = build_module(cfg)
    module.train()
    with torch.no_grad():  # a few batches move the running statistics away from (0, 1)
        for _ in range(3):
            module(torch.randn(2, 3, 40, 48) * 2 + 0.5)
    module.eval()
    return module, _checkpoint(module, tmp / "model.ckpt")


def _reference_ids(module, image: np.ndarray, size=(40, 48)) -> np.ndarray:
    """Class ids the module's own evaluation path gives (resize, normalise, predict_logits, upsample)."""
    from datamodules.batch import normalize_image
    from datamodules.transforms import build_eval_transform

    x = normalize_image(build_eval_transform(size)({"image": image})["image"][None])
    with torch.no_grad():
        logits = module.predict_logits(x)
        logits = F.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=False)
    return logits.argmax(1)[0].numpy().astype(np.uint8)


def _image(seed: int, shape=(37, 53)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Smooth blobs rather than noise: the argmax is not decided by rounding noise.
    small = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    return cv2.resize(small, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def test_checkpoint_carries_build_config(trained):
    module, ckpt = trained
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    config = saved["rimlab_config"]
    assert config["model"]["_target_"] == "lightning_modules.nets.PSPNet"
    assert config["model"]["num_classes"] == 59
    assert config["data"]["eval_size"] == [40, 48]
    from datamodules.transforms import AUGMENTATION_VERSION

    assert saved["rimlab_augmentation"] == AUGMENTATION_VERSION


def test_predict_runs_full_resolution_datasets_at_their_own_size(trained, tmp_path):
    """eval_size null: the crop size for most datasets, each image's own size for Cityscapes and
    NYUDv2, as their validation does; the checkpoint says which."""
    from experiments.keys import inference_config as checkpoint_build_config

    cs = checkpoint_build_config(compose_cfg(["experiment=pspnet_cityscapes"], tmp_path / "c"))
    assert cs["data"]["eval_size"] is None and cs["data"]["full_resolution_eval"] is True
    _, ckpt = trained
    assert (
        torch.load(ckpt, weights_only=True)["rimlab_config"]["data"]["full_resolution_eval"]
        is False
    )
    assert (cs["data"]["base_size"], cs["data"]["base_side"]) == (1024, "short")
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    # Without base_size (checkpoints from before the scale protocol): crop_size or own size.
    for full, expected in ((True, None), (False, (24, 24))):
        data = saved["rimlab_config"]["data"]
        data.update(eval_size=None, crop_size=[24, 24], full_resolution_eval=full, base_size=None)
        torch.save(saved, tmp_path / "c.ckpt")
        assert load_parser(tmp_path / "c.ckpt").eval_size == expected
    # With base_size, eval_size null is the base_size fit for every dataset, as validation does.
    for full in (True, False):
        saved["rimlab_config"]["data"].update(full_resolution_eval=full, base_size=112)
        torch.save(saved, tmp_path / "c.ckpt")
        parser = load_parser(tmp_path / "c.ckpt")
        assert parser.eval_size is None and (parser.base_size, parser.base_side) == (112, "long")


def test_resume_from_another_augmentation_version_warns(trained, caplog):
    module, ckpt = trained
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    module.on_load_checkpoint(saved)
    assert "augmentation draws" not in caplog.text
    del saved["rimlab_augmentation"]  # written before the version existed: version 1
    module.on_load_checkpoint(saved)
    assert "augmentation draws of version 1" in caplog.text


def test_predict_image_matches_predict_logits(trained, tmp_path):
    module, ckpt = trained
    image = _image(1)
    Image.fromarray(image).save(tmp_path / "photo.png")
    out = tmp_path / "out"
    main(
        [
            f"ckpt={ckpt}",
            f"input={tmp_path / 'photo.png'}",
            f"output={out}",
            "device=cpu",
            "save_logits=true",
        ]
    )
    png = Image.open(out / "photo.png")
    assert png.mode == "P" and png.size == (53, 37)
    ids = np.asarray(png)
    np.testing.assert_array_equal(ids, _reference_ids(module, image))
    logits = np.load(out / "photo_logits.npy")
    assert logits.shape == (59, 37, 53) and logits.dtype == np.float32
    np.testing.assert_array_equal(logits.argmax(0), ids)
    overlay = np.asarray(Image.open(out / "photo_overlay.jpg"))
    assert overlay.shape == (37, 53, 3)
    # The palette maps ids to the data config's colours (the VOC map for the synthetic set).
    from datamodules.batch import make_palette

    palette = np.asarray(png.getpalette()[: 59 * 3]).reshape(59, 3)
    np.testing.assert_array_equal(palette, make_palette(59))


def test_predict_flip_protocol_and_original_size(trained, tmp_path):
    module, ckpt = trained
    image = _image(2, shape=(32, 40))
    parser = load_parser(ckpt, "cpu", eval_config="flip", size="original")
    ids, _ = parser.predict(image)
    from lightning_modules.inference import InferenceProtocol

    module.inference = InferenceProtocol(flip=True, flip_pairs=parser.flip_pairs, num_classes=59)
    try:
        np.testing.assert_array_equal(ids, _reference_ids(module, image, size=(32, 40)))
    finally:
        module.inference = None
    assert parser.inference.flip and parser.eval_size is None


def test_predict_folder(trained, tmp_path):
    _, ckpt = trained
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(_image(3)).save(src / "a.jpg")
    Image.fromarray(_image(4, (20, 30))).save(src / "sub" / "b.png")
    (src / "broken.jpg").write_bytes(b"not an image")
    summary = main([f"ckpt={ckpt}", f"input={src}", f"output={tmp_path / 'o'}", "device=cpu"])
    assert summary["images"] == 2 and len(summary["failed"]) == 1
    assert Image.open(tmp_path / "o" / "sub" / "b.png").size == (30, 20)
    assert (tmp_path / "o" / "a_overlay.jpg").is_file()


def test_predict_video(trained, tmp_path):
    module, ckpt = trained
    video = tmp_path / "clip.avi"
    # MJPG in AVI: an encoder every OpenCV build has; frames read back are what the parser sees.
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (48, 32))
    assert writer.isOpened()
    for i in range(5):
        writer.write(cv2.cvtColor(_image(10 + i, (32, 48)), cv2.COLOR_RGB2BGR))
    writer.release()
    out = tmp_path / "vid"
    summary = main(
        [f"ckpt={ckpt}", f"input={video}", f"output={out}", "device=cpu", "save_frames=true"]
    )
    assert summary["frames"] == 5 and summary["fps"] > 0
    result = cv2.VideoCapture(summary["video"])
    assert int(result.get(cv2.CAP_PROP_FRAME_COUNT)) == 5
    assert (
        int(result.get(cv2.CAP_PROP_FRAME_WIDTH)),
        int(result.get(cv2.CAP_PROP_FRAME_HEIGHT)),
    ) == (48, 32)
    result.release()
    # Frame ids equal the module's prediction of the decoded frame.
    capture = cv2.VideoCapture(str(video))
    ok, frame = capture.read()
    capture.release()
    assert ok
    first = np.asarray(Image.open(out / "clip" / "000000.png"))
    np.testing.assert_array_equal(
        first, _reference_ids(module, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    )
    # Two frames per network pass (the last pass has one): the same frame PNGs.
    batched = tmp_path / "vid2"
    main([f"ckpt={ckpt}", f"input={video}", f"output={batched}", "device=cpu", "save_frames=true",
          "batch_frames=2"])  # fmt: skip
    names = sorted(p.name for p in (out / "clip").glob("*.png"))
    assert len(names) == 5 and names == sorted(p.name for p in (batched / "clip").glob("*.png"))
    for name in names:
        np.testing.assert_array_equal(
            np.asarray(Image.open(out / "clip" / name)),
            np.asarray(Image.open(batched / "clip" / name)),
        )


def test_frame_batch_size_rules():
    from experiments.predict import frame_batch_size

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert frame_batch_size("auto", cuda, live=False) == 8
    assert frame_batch_size("auto", cuda, live=False, pixels=1920 * 1080) == 8
    assert frame_batch_size("auto", cuda, live=False, pixels=3840 * 2160) == 2
    assert frame_batch_size("auto", cuda, live=False, pixels=8 * 3840 * 2160) == 1
    assert frame_batch_size(None, cuda, live=True) == 1
    assert frame_batch_size("auto", cpu, live=False) == 1
    assert frame_batch_size(3, cpu, live=True) == 3
    for bad in (0, -2, "many", 2.5):
        with pytest.raises(PredictError, match="batch_frames=.*positive integer or auto"):
            frame_batch_size(bad, cpu, live=False)


def test_clear_errors(trained, tmp_path):
    _, ckpt = trained
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        main([f"ckpt={tmp_path / 'nope.ckpt'}", f"input={tmp_path}", f"output={tmp_path}"])
    with pytest.raises(ConfigCompositionException, match="Could not override 'colour'"):
        main([f"ckpt={ckpt}", f"input={tmp_path}", f"output={tmp_path}", "colour=red"])
    with pytest.raises(PredictError, match="missing output"):
        main([f"ckpt={ckpt}", f"input={tmp_path}"])
    with pytest.raises(PredictError, match="input not found"):
        main([f"ckpt={ckpt}", f"input={tmp_path / 'missing.jpg'}", f"output={tmp_path / 'o'}"])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\x00\x01")
    with pytest.raises(PredictError, match="not a readable image"):
        main([f"ckpt={ckpt}", f"input={bad}", f"output={tmp_path / 'o'}", "device=cpu"])
    (tmp_path / "junk.ckpt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="cannot be read"):
        main([f"ckpt={tmp_path / 'junk.ckpt'}", f"input={bad}", f"output={tmp_path / 'o'}"])
    old = torch.load(ckpt, map_location="cpu", weights_only=False)
    del old["rimlab_config"]
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.raises(CheckpointError, match="model=<conf/model name>"):
        load_parser(tmp_path / "old.ckpt")
    # ... and the fallback rebuilds it from the group names.
    parser = load_parser(tmp_path / "old.ckpt", model="pspnet_lite", data="synthetic_mhp")
    assert parser.num_classes == 59


def test_camera_index_without_display_writes_a_video(trained, tmp_path, monkeypatch):
    """input=0 on a machine without a display: the stream goes to camera0_parsing.mp4.

    No camera exists here: cv2.VideoCapture(0) is redirected to a generated clip, so this covers
    the command's camera branch, not a real device.
    """
    import experiments.predict as predict

    _, ckpt = trained
    clip = tmp_path / "cam.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (40, 30))
    for i in range(6):
        writer.write(cv2.cvtColor(_image(20 + i, (30, 40)), cv2.COLOR_RGB2BGR))
    writer.release()
    real_capture = cv2.VideoCapture
    opened = []

    def fake_capture(source):
        opened.append(source)
        return real_capture(str(clip) if isinstance(source, int) else source)

    monkeypatch.setattr(predict.cv2, "VideoCapture", fake_capture)
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    summary = main([f"ckpt={ckpt}", "input=0", f"output={tmp_path / 'cam'}", "max_frames=4"])
    assert opened[0] == 0 and summary["frames"] == 4
    assert summary["video"].endswith("camera0_parsing.mp4")
    if not predict.gui_available():
        # show=true on a headless OpenCV build falls back to the output video.
        shown = main(
            [f"ckpt={ckpt}", "input=0", f"output={tmp_path / 'c2'}", "max_frames=2", "show=true"]
        )
        assert shown["frames"] == 2 and shown["video"].endswith("camera0_parsing.mp4")
    monkeypatch.setattr(predict.cv2, "VideoCapture", real_capture)
    result = cv2.VideoCapture(summary["video"])
    assert int(result.get(cv2.CAP_PROP_FRAME_COUNT)) == 4
    result.release()


def test_dataset_ids_write_cityscapes_label_ids(trained, tmp_path):
    from cityscapesscripts.helpers.labels import trainId2label

    from experiments.predict import predict_image

    _, ckpt = trained
    with pytest.raises(PredictError, match="has no ids of its own"):
        load_parser(ckpt, prediction_format="dataset_ids")
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["rimlab_config"]["data"]["datamodule"] == "datamodules.mhp.MHPv2DataModule"
    saved["rimlab_config"]["data"]["datamodule"] = "datamodules.cityscapes.CityscapesDataModule"
    torch.save(saved, tmp_path / "cs.ckpt")
    image = _image(3)
    ids, _ = load_parser(tmp_path / "cs.ckpt").predict(image)
    parser = load_parser(tmp_path / "cs.ckpt", prediction_format="dataset_ids")
    predict_image(parser, image, tmp_path / "out" / "x")
    to_label_id = np.zeros(256, np.uint8)
    for t in range(19):
        to_label_id[t] = trainId2label[t].id
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "out" / "x.png")), to_label_id[ids]
    )
