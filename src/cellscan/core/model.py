"""The Keras graph: a fully convolutional reconstruction network and a discriminative head (no fitting, no I/O).

Both halves follow DRAEM (Zavrtanik et al., ICCV 2021), made small enough to train on a CPU:

- **reconstruction**: an encoder-decoder without skip connections (so it cannot copy its input),
  trained to turn an image carrying a simulated anomaly back into the clean image;
- **head**: a small U-Net that sees the image and its reconstruction side by side and predicts
  the anomaly mask (logits).

No dense layer: the graph takes any height and width that divide by ``ModelParams.multiple``, so
it trains on crops and scores whole images at their own scale.
"""

from __future__ import annotations

import keras
from keras import layers

from cellscan.core.config import ModelParams


@keras.saving.register_keras_serializable(package="cellscan")
class AbsDiff(layers.Layer):  # type: ignore[misc]
    """|a - b|, a named layer (not a Lambda) so saved models load in safe mode."""

    def call(self, inputs: list[keras.KerasTensor]) -> keras.KerasTensor:
        return keras.ops.abs(inputs[0] - inputs[1])

    def compute_output_shape(self, shapes: list[tuple[int | None, ...]]) -> tuple[int | None, ...]:
        return shapes[0]


def _block(x: keras.KerasTensor, filters: int, name: str, stride: int = 1, convs: int = 2) -> keras.KerasTensor:
    for i in range(convs):
        x = layers.Conv2D(filters, 3, strides=stride if i == 0 else 1, padding="same", name=f"{name}_{i}")(x)
        x = layers.LeakyReLU(0.2)(x)
    return x


def _reconstruction(inputs: keras.KerasTensor, channels: int, p: ModelParams) -> keras.KerasTensor:
    x = inputs
    for i in range(p.depth):
        x = _block(x, p.base_filters * 2**i, f"enc{i}", stride=2)
    x = layers.Conv2D(p.bottleneck, 1, name="bottleneck")(x)
    x = layers.LeakyReLU(0.2)(x)
    if p.dropout:
        x = layers.SpatialDropout2D(p.dropout)(x)
    # Decoder: one conv a level, and none at full resolution (where a conv costs the most CPU time):
    # the last feature map, at half resolution, is upsampled and mapped to pixels by one thin conv.
    for i in reversed(range(p.depth - 1)):
        x = layers.UpSampling2D(2, interpolation="bilinear")(x)
        x = _block(x, p.base_filters * 2**i, f"dec{i}", convs=1)
    x = layers.UpSampling2D(2, interpolation="bilinear")(x)
    return layers.Conv2D(channels, 3, padding="same", activation="sigmoid", name="recon")(x)


def _head(image: keras.KerasTensor, recon: keras.KerasTensor, p: ModelParams) -> keras.KerasTensor:
    """A U-Net from half resolution down to 1/2**head_depth; its mask logits are upsampled to full size."""
    # The head compares: it sees the image, the reconstruction and their absolute difference.
    diff = AbsDiff(name="abs_diff")([image, recon])
    x = layers.Concatenate(name="head_in")([image, recon, diff])
    x = _block(x, p.head_filters, "head_enc0", stride=2)
    skips = [x]
    for i in range(1, p.head_depth):
        x = layers.MaxPooling2D(2)(x)
        x = _block(x, p.head_filters * 2**i, f"head_enc{i}")
        skips.append(x)
    for i in reversed(range(p.head_depth - 1)):
        x = layers.UpSampling2D(2, interpolation="bilinear")(x)
        x = layers.Concatenate()([x, skips[i]])
        x = _block(x, p.head_filters * 2**i, f"head_dec{i}", convs=1)
    x = layers.Conv2D(1, 1, name="mask_half")(x)
    return layers.UpSampling2D(2, interpolation="bilinear", name="mask")(x)


def build_network(channels: int, p: ModelParams) -> keras.Model:
    """The scoring graph: image (N, H, W, C) in [0, 1] -> ``{"recon": (N, H, W, C), "mask": (N, H, W, 1) logits}``.

    Without a head (``p.head_filters == 0``) the output holds ``recon`` only.
    """
    inputs = keras.Input(shape=(None, None, channels), name="image")
    recon = _reconstruction(inputs, channels, p)
    outputs = {"recon": recon}
    if p.head_filters:
        outputs["mask"] = _head(inputs, recon, p)
    return keras.Model(inputs, outputs, name="cellscan")
