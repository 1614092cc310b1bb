"""Should the app trust this answer: `ood` (is the image unlike the training images: a
Mahalanobis density of the CNN's pooled features and one of `image_stats`, the input's colour,
edge and layout statistics), `words` (which question words the model never saw), `abstention`
(the confidence below which it says "not sure", at a chosen risk), `rates` (AUROC and joint
thresholds) and `fit` (fits all of them into a checkpoint once its weights are final)."""
