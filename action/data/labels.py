"""The training package's label convention (docs/conventions.md has the whole picture, ops included).

IGNORE_INDEX = 255 marks pixels that count in no loss: cutout boxes, unconfident or padded pseudo-labels. 255 fits
the uint8 label maps and is no class. Every loss and augmentation of the training package defaults to it
(AugmentConfig.ignore_index, cutout, supervised_loss, dice_loss, the pseudo-label loss). The ops of action_kernels
take the caller's value as ignore_label (their own default is -1); the stage iii sampling grid, built here and handed
straight to the ops, marks its invalid pixels -1.
"""

IGNORE_INDEX = 255
