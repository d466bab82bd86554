"""Per-channel statistics of the data sets: the one home of the mean and std that the models' timm cfgs carry
and the training data is normalised with, and of the ImageNet colour components of fb.resnet.torch's
lighting noise. Free of imports, so that the models do not import the data pipeline.
"""

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
SVHN_MEAN, SVHN_STD = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Principal components of ImageNet's RGB pixels (values in [0, 1]), as fb.resnet.torch's datasets/imagenet.lua
# gives them: the columns of the matrix are the eigenvectors.
IMAGENET_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                       (-0.5808, -0.0045, -0.8140),
                       (-0.5836, -0.6948, 0.4203))
# Pixel statistics of the digits training split (values / 16, as in load_digits_split), one grey channel
# repeated three times. tests/test_data.py recomputes them.
DIGITS_MEAN, DIGITS_STD = (0.3049,) * 3, (0.3758,) * 3
