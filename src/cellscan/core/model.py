"""The Keras graph of the convolutional autoencoder (no fitting, no I/O)."""

from __future__ import annotations

import keras
from keras import layers

from cellscan.core.config import ModelParams
from cellscan.errors import ConfigError


def build_autoencoder(image_size: int, channels: int, p: ModelParams) -> keras.Model:
    """Build a conv autoencoder with a dense bottleneck and a sigmoid output in [0, 1].

    Args:
        image_size: side of the square input; must be divisible by ``2 ** p.depth``.
        channels: 1 (grayscale) or 3 (RGB).
        p: filters, depth, latent size and dropout.

    Raises:
        ConfigError: the image size does not divide by ``2 ** depth``.
    """
    if image_size % (2**p.depth):
        msg = f"image_size {image_size} must be divisible by 2**model.depth = {2**p.depth}"
        raise ConfigError(msg)
    inputs = keras.Input(shape=(image_size, image_size, channels), name="image")

    # Encoder
    x = inputs
    for i in range(p.depth):
        filters = p.base_filters * 2**i
        x = layers.Conv2D(filters, 3, strides=2, padding="same", name=f"enc{i}_down")(x)
        x = layers.LeakyReLU(0.2)(x)
        x = layers.Conv2D(filters, 3, padding="same", name=f"enc{i}_conv")(x)
        x = layers.LeakyReLU(0.2)(x)
    bottom = image_size // 2**p.depth
    bottom_filters = p.base_filters * 2 ** (p.depth - 1)
    x = layers.Flatten()(x)
    x = layers.Dropout(p.dropout)(x)
    latent = layers.Dense(p.latent_dim, name="latent")(x)

    # Decoder
    x = layers.Dense(bottom * bottom * bottom_filters)(latent)
    x = layers.LeakyReLU(0.2)(x)
    x = layers.Reshape((bottom, bottom, bottom_filters))(x)
    for i in reversed(range(p.depth)):
        filters = p.base_filters * 2**i
        x = layers.Conv2DTranspose(filters, 3, strides=2, padding="same", name=f"dec{i}_up")(x)
        x = layers.LeakyReLU(0.2)(x)
        x = layers.Conv2D(filters, 3, padding="same", name=f"dec{i}_conv")(x)
        x = layers.LeakyReLU(0.2)(x)
    outputs = layers.Conv2D(channels, 3, padding="same", activation="sigmoid", name="reconstruction")(x)
    return keras.Model(inputs, outputs, name="cellscan_autoencoder")
