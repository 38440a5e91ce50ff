"""Stateless ops: each a ``forward(...) -> (out, cache)`` / ``backward(dout, cache)``
pair written once against ``xp = get_array_module(x)``, so the same code runs on
NumPy and CuPy.  dtype in = dtype out; inputs are never modified."""

from .activation import relu_backward, relu_forward, sigmoid
from .conv import conv2d_backward, conv2d_forward
from .ctc import ctc_beam_decode, ctc_best_path, ctc_greedy_decode, ctc_loss
from .dense import dense_backward, dense_forward
from .dropout import dropout_backward, dropout_forward, dropout_mask
from .im2col import col2im, conv_output_size, im2col, im2col_nbytes
from .loss import log_softmax, sigmoid_bce_with_logits, softmax_cross_entropy
from .norm import batchnorm_backward, batchnorm_forward
from .pool import max_pool2d_backward, max_pool2d_forward
from .recurrent import gru_backward, gru_forward

__all__ = [
    "im2col", "col2im", "im2col_nbytes", "conv_output_size",
    "conv2d_forward", "conv2d_backward",
    "max_pool2d_forward", "max_pool2d_backward",
    "dense_forward", "dense_backward",
    "relu_forward", "relu_backward", "sigmoid",
    "sigmoid_bce_with_logits", "softmax_cross_entropy", "log_softmax",
    "batchnorm_forward", "batchnorm_backward",
    "dropout_mask", "dropout_forward", "dropout_backward",
    "ctc_loss", "ctc_greedy_decode", "ctc_beam_decode", "ctc_best_path",
    "gru_forward", "gru_backward",
]
