"""The data sets' statistics under their earlier names; their home is ``sdzoo.datasets``."""
from .datasets import DATASETS

CIFAR10_MEAN, CIFAR10_STD = DATASETS["cifar10"].mean, DATASETS["cifar10"].std
CIFAR100_MEAN, CIFAR100_STD = DATASETS["cifar100"].mean, DATASETS["cifar100"].std
SVHN_MEAN, SVHN_STD = DATASETS["svhn"].mean, DATASETS["svhn"].std
IMAGENET_MEAN, IMAGENET_STD = DATASETS["imagenet"].mean, DATASETS["imagenet"].std
IMAGENET_PCA_EIGVAL, IMAGENET_PCA_EIGVEC = DATASETS["imagenet"].pca_eigval, DATASETS["imagenet"].pca_eigvec
DIGITS_MEAN, DIGITS_STD = DATASETS["digits"].mean, DATASETS["digits"].std
