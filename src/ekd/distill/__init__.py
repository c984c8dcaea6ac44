"""Distillers: one file per method, registered by name (see :mod:`ekd.distill.base`)."""

from ekd.distill.base import DISTILLERS, Distiller, build_distiller, distiller_params, register_distiller
from ekd.distill.ekd import EKDLoss

__all__ = ["DISTILLERS", "Distiller", "EKDLoss", "build_distiller", "distiller_params",
           "register_distiller"]
