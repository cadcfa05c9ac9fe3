"""Model building (every arch at a small size), grayscale -> RGB, augmentation that is off at
inference, weight transfer and files, the head/feature split. Real Keras, no Ray."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from medray.workers.errors import ConfigError, InputError
from medray.workers.models import (
    ARCHS,
    Augment,
    ModelCard,
    apply_weights_file,
    backbone_of,
    build_head,
    build_model,
    canonical_augment,
    check_arch,
    feature_extractor,
    freeze_backbone,
    parse_augment,
    recipe_for,
    set_head,
    shifts_scores,
    transfer_weights,
)

MIN_SIZE = {"small_cnn": 28, "mobilenet_v2": 32, "efficientnet_b0": 32, "densenet121": 32,
            "inception_v3": 75}


def _pixels(n: int, size: int, channels: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels)).astype(
        np.float32)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_builds_at_its_smallest_size_and_scores(arch):
    size = MIN_SIZE[arch]
    model = build_model(arch, size, 1, 3, multi_label=False)
    out = np.asarray(model(_pixels(2, size, 1), training=False))
    assert out.shape == (2, 3)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)  # softmax over the labels
    assert model.get_layer("features") is not None
    if arch != "small_cnn":
        assert backbone_of(model) is not None
        assert model.get_layer("gray_to_rgb") is not None


def test_multi_label_model_gives_independent_sigmoids():
    model = build_model("small_cnn", 28, 1, 4, multi_label=True)
    out = np.asarray(model(_pixels(3, 28, 1), training=False))
    assert out.shape == (3, 4)
    assert np.all((out > 0) & (out < 1))
    assert not np.allclose(out.sum(axis=1), 1.0)


def test_small_cnn_shrinks_large_inputs_before_the_conv_blocks():
    small = build_model("small_cnn", 28, 1, 2, False)
    large = build_model("small_cnn", 224, 1, 2, False)
    assert not [layer.name for layer in small.layers if layer.name.startswith("stem")]
    # 224 -> 112 -> 56 -> 28: three stride-2 stems, then the same blocks as at 28 px
    assert large.get_layer("conv0").input.shape[1] == 28
    assert large.get_layer("stem2").output.shape[1] == 28


def test_gray_input_equals_the_rgb_model_fed_the_repeated_channel():
    gray = build_model("mobilenet_v2", 32, 1, 2, False, seed=3)
    rgb = build_model("mobilenet_v2", 32, 3, 2, False, seed=4)
    copied, skipped = transfer_weights(gray, rgb)
    assert copied > 100 and skipped == []
    x = _pixels(2, 32, 1)
    np.testing.assert_allclose(np.asarray(gray(x, training=False)),
                               np.asarray(rgb(np.repeat(x, 3, axis=-1), training=False)),
                               rtol=1e-4, atol=1e-5)


def test_too_small_images_and_unknown_arch_name_the_fix():
    with pytest.raises(ConfigError, match="--image-size"):
        check_arch("inception_v3", 64)
    with pytest.raises(ConfigError, match="choose one of"):
        build_model("resnet9000", 32, 1, 2, False)
    with pytest.raises(ConfigError, match="channels"):
        build_model("small_cnn", 28, 2, 2, False)


def test_parse_augment_forms():
    assert parse_augment(None) is None and parse_augment(False) is None
    assert parse_augment("none") is None
    assert parse_augment(True) == Augment() == parse_augment("default")
    assert Augment() == Augment(flip=False, crop=0.05, rotation=0.02, brightness=0.1)
    aug = parse_augment("flip,crop=0.2")
    assert aug == Augment(flip=True, crop=0.2, rotation=0.0, brightness=0.0)
    rotate = parse_augment("rotate=0.05")
    assert rotate is not None and rotate.rotation == 0.05
    with pytest.raises(ConfigError, match="unknown transform"):
        parse_augment("flip,blur")
    with pytest.raises(ConfigError, match=r"\[0, 0.5\]"):
        parse_augment("crop=0.9")
    assert parse_augment("light") == Augment()
    assert parse_augment(" Strong ") == Augment(crop=0.25, rotation=0.08, brightness=0.3)
    # auto needs the images' side: a spec resolves it (recipe_for) before layers are built
    with pytest.raises(ConfigError, match="chosen by the images' side"):
        parse_augment("auto")


def test_auto_is_strong_below_128_px_and_light_from_there():
    assert [recipe_for("auto", px) for px in (8, 28, 64, 127, 128, 224, 512)] == \
        ["strong"] * 4 + ["light"] * 3
    assert recipe_for("light", 28) == "light" and recipe_for("strong", 224) == "strong"
    assert canonical_augment("AUTO") == "auto"


def test_a_crop_of_015_or_more_shifts_the_scores():
    assert shifts_scores("strong") and shifts_scores("crop=0.15")
    assert not shifts_scores("light") and not shifts_scores("crop=0.1,brightness=0.3")
    assert not shifts_scores("rotation=0.3")



def test_augmentation_is_active_in_training_only():
    plain = build_model("small_cnn", 28, 1, 2, False, dropout=0.0, seed=1)
    every = Augment(flip=True)
    aug = build_model("small_cnn", 28, 1, 2, False, dropout=0.0, seed=1, augment=every)
    assert {"aug_flip", "aug_crop", "aug_rotate", "aug_brightness"} <= {
        layer.name for layer in aug.layers}
    preset = build_model("small_cnn", 28, 1, 2, False, dropout=0.0, seed=1, augment=Augment())
    assert "aug_flip" not in {layer.name for layer in preset.layers}  # X-rays keep their sides
    transfer_weights(plain, aug)
    x = _pixels(4, 28, 1)
    infer = np.asarray(aug(x, training=False))
    np.testing.assert_allclose(infer, np.asarray(plain(x, training=False)), atol=1e-6)
    # BatchNorm also changes with training=True; compare against the plain model in training
    train_plain = np.asarray(plain(x, training=True))
    train_aug = np.asarray(aug(x, training=True))
    assert not np.allclose(train_plain, train_aug, atol=1e-4)


def test_same_seed_same_initial_weights_other_seed_not():
    a = build_model("mobilenet_v2", 32, 1, 2, False, seed=7)
    b = build_model("mobilenet_v2", 32, 1, 2, False, seed=7)
    c = build_model("mobilenet_v2", 32, 1, 2, False, seed=8)
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
    assert not all(np.array_equal(wa, wc) for wa, wc in
                   zip(a.get_weights(), c.get_weights(), strict=True))


def test_transfer_from_other_labels_keeps_only_the_head():
    source = build_model("small_cnn", 28, 1, 5, True, seed=1)
    target = build_model("small_cnn", 28, 1, 2, False, seed=2)
    copied, skipped = transfer_weights(source, target)
    assert skipped == ["scores"]
    np.testing.assert_array_equal(target.get_layer("conv1").get_weights()[0],
                                  source.get_layer("conv1").get_weights()[0])
    assert copied == len(target.weights) - 2  # everything but the Dense kernel and bias


def _backbone(model: Any) -> Any:
    found = backbone_of(model)
    assert found is not None, "the model has no nested ImageNet backbone"
    return found


def test_transfer_moves_backbone_weights_between_input_sizes():
    source = build_model("mobilenet_v2", 32, 1, 2, False, seed=1)
    target = build_model("mobilenet_v2", 48, 1, 2, False, seed=2)
    copied, skipped = transfer_weights(source, target)
    assert skipped == [] and copied == len(target.weights)
    np.testing.assert_array_equal(_backbone(target).get_weights()[0],
                                  _backbone(source).get_weights()[0])


def test_weights_files_keras_weights_h5_and_backbone_only(tmp_path):
    source = build_model("mobilenet_v2", 32, 1, 2, False, seed=5)
    source.save(tmp_path / "m.keras")
    source.save_weights(tmp_path / "m.weights.h5")
    _backbone(source).save_weights(tmp_path / "bb.weights.h5")
    expected = _backbone(source).get_weights()[0]
    for name in ("m.keras", "m.weights.h5", "bb.weights.h5"):
        target = build_model("mobilenet_v2", 32, 1, 2, False, seed=6)
        assert not np.array_equal(_backbone(target).get_weights()[0], expected)
        note = apply_weights_file(target, str(tmp_path / name))
        assert name in note
        np.testing.assert_array_equal(_backbone(target).get_weights()[0], expected)


def test_weights_of_another_arch_are_refused(tmp_path):
    build_model("small_cnn", 32, 1, 2, False).save(tmp_path / "cnn.keras")
    build_model("small_cnn", 32, 1, 2, False).save_weights(tmp_path / "cnn.weights.h5")
    target = build_model("mobilenet_v2", 32, 1, 2, False)
    with pytest.raises(InputError, match="same --arch"):
        apply_weights_file(target, str(tmp_path / "cnn.keras"))
    with pytest.raises(InputError, match="does not fit"):
        apply_weights_file(target, str(tmp_path / "cnn.weights.h5"))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(InputError, match=".keras, .weights.h5"):
        apply_weights_file(target, str(tmp_path / "w.bin"))


def test_head_on_features_equals_the_full_model():
    full = build_model("mobilenet_v2", 32, 1, 3, True, seed=2)
    head = build_head(full.get_layer("features").output.shape[-1], 3, True, seed=9)
    set_head(full, head)
    x = _pixels(3, 32, 1)
    feats = np.asarray(feature_extractor(full)(x, training=False))
    np.testing.assert_allclose(np.asarray(head(feats, training=False)),
                               np.asarray(full(x, training=False)), rtol=1e-5, atol=1e-6)


def test_freeze_backbone_leaves_only_the_head_trainable():
    model = build_model("small_cnn", 28, 1, 2, False)
    assert freeze_backbone(model) == 2
    assert {id(w) for w in model.trainable_weights} == {
        id(w) for w in model.get_layer("scores").weights}


def test_imagenet_without_network_fails_fast_with_the_fix():
    from medray.cluster.train.weights import imagenet_reachable

    if imagenet_reachable("mobilenet_v2"):
        pytest.skip("this machine can download ImageNet weights (or has them cached)")
    started = time.monotonic()
    with pytest.raises(InputError, match="--weights PATH") as err:
        build_model("mobilenet_v2", 32, 1, 2, False, weights="imagenet")
    assert time.monotonic() - started < 40
    assert "MobileNetV2" in str(err.value)


def test_card_round_trips_with_training_block():
    card = ModelCard(name="m", labels=["a", "b"], multi_label=True, input_size=28, channels=1,
                     arch="small_cnn", training={"id": "m-1", "jobs": ["j1", "j2"]})
    import json

    again = ModelCard.from_dict(json.loads(card.to_json()))
    assert again == card
    assert ModelCard.from_dict({**json.loads(card.to_json()), "future_field": 1}) == card
