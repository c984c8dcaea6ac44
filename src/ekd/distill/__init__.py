"""Distillers: one file per method, registered by name (see :mod:`ekd.distill.base`).

Importing this package registers every method: ``ekd`` (the paper), the baselines of its tables
(``fitnet``, ``kd``, ``darkrank``, ``sp``, ``cckd``, ``rkd``, ``cosine``, ``shrinkteanet``,
``triplet_distill``, ``margin_distill``, ``proxylesskd``), ``adadistill`` (ECCV 2024),
``coupleface`` (ECCV 2022), ``gkd`` (AAAI 2023), ``icd_face`` (ICCV 2023) and ``unified_kd``
(ILED + RPSD, IJCB 2025).
"""

from ekd.distill.adadistill import AdaDistillLoss
from ekd.distill.base import (CLASS_EXTRAS, DISTILLERS, EXTRA_INPUTS, EXTRAS, STUDENT_CLASSIFIER_EXTRAS,
                              TEACHER_CLASSIFIER_EXTRAS, TRAINER_FILLED_PARAMS, Distiller, build_distiller,
                              distiller_params, needs_teacher_classifier, register_distiller,
                              supports_class_shard)
from ekd.distill.cckd import CCKDLoss
from ekd.distill.cosine import CosineLoss
from ekd.distill.coupleface import CoupleFaceLoss
from ekd.distill.darkrank import HardDarkRankLoss
from ekd.distill.ekd import EKDLoss
from ekd.distill.fitnet import FitNetLoss
from ekd.distill.gkd import GKDLoss
from ekd.distill.icd_face import ICDFaceLoss
from ekd.distill.kd import KDLoss
from ekd.distill.margin_distill import MarginDistillLoss
from ekd.distill.proxylesskd import ProxylessKDLoss
from ekd.distill.rkd import RKDLoss
from ekd.distill.shrinkteanet import ShrinkTeaNetLoss
from ekd.distill.sp import SPLoss
from ekd.distill.triplet_distill import TripletDistillLoss
from ekd.distill.unified_kd import UnifiedKDLoss

__all__ = ["CLASS_EXTRAS", "DISTILLERS", "EXTRAS", "EXTRA_INPUTS", "STUDENT_CLASSIFIER_EXTRAS",
           "TEACHER_CLASSIFIER_EXTRAS", "TRAINER_FILLED_PARAMS", "AdaDistillLoss", "CCKDLoss", "CosineLoss",
           "CoupleFaceLoss", "Distiller", "EKDLoss", "FitNetLoss", "GKDLoss", "HardDarkRankLoss", "ICDFaceLoss",
           "KDLoss", "MarginDistillLoss", "ProxylessKDLoss", "RKDLoss", "SPLoss", "ShrinkTeaNetLoss",
           "TripletDistillLoss", "UnifiedKDLoss", "build_distiller", "distiller_params",
           "needs_teacher_classifier", "register_distiller", "supports_class_shard"]
