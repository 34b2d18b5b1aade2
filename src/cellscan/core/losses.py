"""The training loss: (1 - w) * MSE + w * (1 - SSIM), registered so saved models reload anywhere."""

from __future__ import annotations

from typing import Any

import keras

_C1, _C2 = 0.01**2, 0.03**2


@keras.saving.register_keras_serializable(package="cellscan")
class ReconstructionLoss(keras.losses.Loss):  # type: ignore[misc]
    """MSE blended with 1 - SSIM over 7x7 box windows (as scikit-image does; cheap on a CPU)."""

    def __init__(self, ssim_weight: float = 0.5, name: str = "reconstruction_loss", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.ssim_weight = float(ssim_weight)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        import tensorflow as tf

        mse = tf.reduce_mean(tf.square(y_true - y_pred), axis=[1, 2, 3])
        if self.ssim_weight == 0:
            return mse

        def box(t: Any) -> Any:
            return tf.nn.avg_pool2d(t, ksize=7, strides=1, padding="VALID")

        mx, my = box(y_true), box(y_pred)
        vx = box(y_true * y_true) - mx * mx
        vy = box(y_pred * y_pred) - my * my
        cxy = box(y_true * y_pred) - mx * my
        ssim = ((2 * mx * my + _C1) * (2 * cxy + _C2)) / ((mx * mx + my * my + _C1) * (vx + vy + _C2))
        return (1 - self.ssim_weight) * mse + self.ssim_weight * (1 - tf.reduce_mean(ssim, axis=[1, 2, 3]))

    def get_config(self) -> dict[str, Any]:
        return super().get_config() | {"ssim_weight": self.ssim_weight}
