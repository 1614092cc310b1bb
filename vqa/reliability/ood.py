"""Is this image unlike the training images? A density test in the model's own CNN feature space.

    density = FeatureDensity().fit(train_features, heldout_features)  # (N, F) pooled CNN features
    density.flag(features)        # True where an image is unusual: at most 1 % of held-out
                                  # in-distribution images are flagged
    density.save(checkpoint_folder); FeatureDensity.load(checkpoint_folder)

The score is the class-agnostic Mahalanobis distance of the L2-normalised feature from the
mean of the training features, under a Ledoit-Wolf shrunk covariance (Ledoit & Wolf 2004,
"A well-conditioned estimator for large-dimensional covariance matrices"; the shrinkage
formula is scikit-learn's `ledoit_wolf_shrinkage`). Shrinkage towards a multiple of the
identity keeps every direction's variance positive, so dead ReLU channels (constant 0) and
fewer images than dimensions (N < F) need no special case.

Why Mahalanobis alone, without k-nearest-neighbour distance (Sun et al. 2022, "Out-of-
distribution detection with deep nearest neighbors"): measured AUROC of in-distribution
test images against each OOD set.

| features | Mahalanobis (LW) | kNN k=1 | kNN k=10 | z-scored sum |
|---|---|---|---|---|
| easy-VQA resnet10t features (F=512), N=3000, worst of benchmarks/ood_sets | 0.9987 | 0.9997 | 0.9991 | 0.9995 |
| same, N=300, worst | 0.9971 | 0.9988 | 0.9449 | 0.9970 |
| synthetic ReLU clusters, F=256, N=2000: new clusters; noise | 1.0000 | 1.0000 | 1.0000 | 1.0000 |
| same: every centre shifted by 0.5 sigma | 0.9939 | 0.9052 | 0.8865 | 0.9817 |
| same: midpoints between training clusters | 0.9871 | 0.9998 | 1.0000 | 0.9994 |
| synthetic, F=2048, N=500: centres shifted by 0.5 sigma | 1.0000 | 0.9578 | 0.9355 | 1.0000 |

(z-scored sum: Mahalanobis + kNN, each standardised on the held-out scores; k=10 on
easy-VQA, k=1 on synthetic.) kNN wins between clusters and loses more on small shifts; its
best k depends on N (k=50 at N=300 scored 0.46 on uniform noise), and it needs the training
features at prediction time (VQA v2: 82,783 x 2048 float16 = 339 MB). Mahalanobis keeps
F x F floats (16 MB at F=2048) and its worst case above is 0.987, so it is used alone.
With the threshold from 1000 held-out training images at 1 %, 0.5 % of easy-VQA's 1000
test images were flagged (0.7 % when fitted on 300). Ledoit-Wolf chose shrinkage 0.0022
(easy-VQA, N=3000), 0.0217 (N=300) and 0.0418 (synthetic F=2048, N=500); a fixed
shrinkage of 0.001 to 0.1 scored within 0.001 of it, 0.5 worse everywhere (worst 0.9937 on
easy-VQA). easy-VQA's shapes are an easy case: re-measure on VQA v2 features with
benchmarks/ood_sets.py before relying on the numbers there.

A second density: image statistics (reliability round 3). The 64-pixel easy-VQA model's
pooled features missed near-world edits and the other built-in world (easy-VQA model; AUROC,
share flagged; benchmarks/bench_ood.py): rotated 0.650 (0 %), bordered 0.967 (32 %), zoomed
0.978 (62 %), shapes-world scenes 0.882 (6 %), photos 0.995 (66 %). `image_statistics` (colour,
gradient and contrast histograms and a coarse colour layout of the model input,
vqa/reliability/image_stats.py) alone scored 1.000 on all but zoomed (0.754), and with 3.3 %
false alarms at a threshold from 400 held-out images. So they get a density of their own, of
this class; an image is flagged when either flags it; both thresholds are set at once
(`rates.joint_thresholds`) on the held-out images and on training images scored out of fold
(5 folds): either then flags 0.7 % of easy-VQA's test images, and every set above has AUROC
1.000 but zoomed (0.996, 93 %). The maps and several layers' statistics were not tried: they
need more of the CNN than its pooled output. Checkpoints saved before keep the CNN density
alone: `score_images` is then `score`.
"""

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from ..errors import CheckpointError
from ..files import atomic_path, atomic_write_text
from .image_stats import DIM as STATISTICS_DIM
from .image_stats import image_statistics
from .rates import joint_thresholds

TENSORS_FILE = "ood.safetensors"
META_FILE = "ood.json"
VERSION = 1
METHOD = "mahalanobis-ledoit-wolf"
CHUNK_ROWS = 4096  # rows normalised at a time: a (N, F) float16 memmap is never copied whole
# Variance floor, relative to the mean variance: it only guards a division by zero when
# Ledoit-Wolf picks no shrinkage; the shrinkage it picked in every measurement above was >= 0.002.
VARIANCE_FLOOR = 1e-6
_TENSORS = ("mean", "components", "variances", "residual_variance")
STATISTICS_PREFIX = "statistics."  # the image-statistics density's tensors in ood.safetensors
STATISTICS_METHOD = "image-statistics-1"  # vqa/reliability/image_stats.py, as it computes them now
CROSS_FOLDS = 5  # training images scored out of fold, for the joint thresholds


def _as_array(features, what: str) -> np.ndarray:
    """(N, F) numpy view of numpy / torch features (any float dtype); (F,) becomes (1, F)."""
    if hasattr(features, "detach"):  # a torch tensor
        features = features.detach().cpu().numpy()
    array = np.asarray(features)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"{what}: expected (images, features), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{what}: expected numbers, got dtype {array.dtype}")
    return array


def _normalised_chunks(features: np.ndarray, what: str):
    """L2-normalised float64 rows, CHUNK_ROWS at a time; all-zero rows stay zero."""
    for start in range(0, len(features), CHUNK_ROWS):
        chunk = np.asarray(features[start : start + CHUNK_ROWS], dtype=np.float64)
        bad = ~np.isfinite(chunk).all(axis=1)
        if bad.any():
            rows = np.flatnonzero(bad)[:5] + start
            raise ValueError(f"{what}: {int(bad.sum())} rows hold NaN or infinity (rows {rows.tolist()}...)")
        norms = np.linalg.norm(chunk, axis=1, keepdims=True)
        yield chunk / np.where(norms > 0, norms, 1.0)


def _shrinkage(eigenvalues: np.ndarray, fourth_moment: float, n: int, p: int) -> float:
    """Ledoit-Wolf shrinkage towards mu * I, from the sample covariance's eigenvalues.

    scikit-learn's ledoit_wolf_shrinkage written with eigenvalues: ||S||_F^2 = sum(lambda^2),
    and sum((X^2)^T X^2) = sum over rows of ||x||^4 (`fourth_moment`).
    """
    mu = eigenvalues.sum() / p
    squares = float((eigenvalues**2).sum())
    delta = (squares - p * mu * mu) / p  # ||S - mu I||_F^2 / p
    beta = (fourth_moment / n - squares) / (p * n)
    return 0.0 if delta <= 0 else float(min(max(beta, 0.0), delta) / delta)


class FeatureDensity:
    """Mahalanobis distance of L2-normalised features from the training mean (see the module docstring).

    The shrunk covariance is kept as its eigenvectors (`components`, (F, K)) and their
    variances (K,); directions outside the K components (K < F when N < F) all have
    `residual_variance`. Parameters are float32, scores are computed in float64.
    """

    def __init__(self):
        self.mean: np.ndarray | None = None  # (F,)
        self.components: np.ndarray | None = None  # (F, K), orthonormal columns
        self.variances: np.ndarray | None = None  # (K,)
        self.residual_variance: float | None = None
        self.threshold: float | None = None
        self.false_alarm_rate: float | None = None
        self.shrinkage: float | None = None
        self.train_images = 0
        self.heldout_images = 0
        # The second detector (None in checkpoints fitted before it): a density of the same kind on
        # image_statistics of the model input; an image is flagged when either density flags it.
        self.statistics: FeatureDensity | None = None
        self.pixel_mean: tuple | None = None  # the model input's normalisation (statistics density only)
        self.pixel_std: tuple | None = None
        self.cross_fitted_images = 0  # training images scored out of fold to set the joint thresholds

    @property
    def feature_dim(self) -> int | None:
        return None if self.mean is None else len(self.mean)

    def fit(self, train_features, heldout_features, false_alarm_rate: float = 0.01, *,
            train_statistics=None, heldout_statistics=None, pixel_mean=None, pixel_std=None,
            folds: int = CROSS_FOLDS, seed: int = 0) -> "FeatureDensity":
        """Fit on `train_features` (N, F), then set the threshold so that a fraction of at most
        `false_alarm_rate` of `heldout_features` (in-distribution images not fitted on) is flagged.

        With `train_statistics` and `heldout_statistics` (the `image_statistics` of the same
        images' model inputs, normalised with `pixel_mean` / `pixel_std`), a second density is
        fitted on those, and both thresholds are chosen together (see `joint_thresholds`): an
        image is flagged when either detector flags it, on at most `false_alarm_rate` of the
        held-out images and of the training images scored out of fold."""
        if not 0 < false_alarm_rate < 1:
            raise ValueError(f"false_alarm_rate must be in (0, 1), got {false_alarm_rate}")
        self._fit_parameters(train_features, "training features")
        heldout = self.score(heldout_features)
        if not len(heldout):
            raise ValueError("held-out features: need at least 1 image to set the threshold")
        self.false_alarm_rate, self.heldout_images = float(false_alarm_rate), len(heldout)
        if train_statistics is None and heldout_statistics is None:
            # "higher": an observed score, with at most floor(rate * n) held-out scores above it.
            self.threshold = float(np.quantile(heldout, 1 - false_alarm_rate, method="higher"))
            return self
        if train_statistics is None or heldout_statistics is None or pixel_mean is None or pixel_std is None:
            raise ValueError("image statistics need train_statistics, heldout_statistics, pixel_mean and pixel_std")
        statistics = FeatureDensity()
        statistics._fit_parameters(train_statistics, "training image statistics")
        if statistics.feature_dim != STATISTICS_DIM:
            raise ValueError(f"image statistics have {statistics.feature_dim} values, expected {STATISTICS_DIM}")
        heldout_statistics_scores = statistics.score(heldout_statistics)
        if len(heldout_statistics_scores) != len(heldout):
            raise ValueError(f"{len(heldout)} held-out features but {len(heldout_statistics_scores)} image statistics")
        statistics.heldout_images, statistics.false_alarm_rate = len(heldout), float(false_alarm_rate)
        statistics.pixel_mean = tuple(float(v) for v in pixel_mean)
        statistics.pixel_std = tuple(float(v) for v in pixel_std)
        inside = _out_of_fold_scores(train_features, train_statistics, folds, seed)
        self.cross_fitted_images = 0 if inside is None else len(inside[0])
        first = heldout if inside is None else np.concatenate([inside[0], heldout])
        second = heldout_statistics_scores if inside is None else np.concatenate([inside[1], heldout_statistics_scores])
        self.threshold, statistics.threshold = joint_thresholds(first, second, len(heldout), false_alarm_rate)
        self.statistics = statistics
        return self

    def _fit_parameters(self, train_features, what: str) -> None:
        """Mean and shrunk covariance of `train_features` (no threshold)."""
        train = _as_array(train_features, what)
        n, p = train.shape
        if n < 2:
            raise ValueError(f"{what}: need at least 2 images, got {n}")
        total = np.zeros(p)
        for chunk in _normalised_chunks(train, what):
            total += chunk.sum(axis=0)
        mean = total / n
        fourth_moment = 0.0
        if n >= p:  # the F x F covariance, accumulated chunk by chunk
            scatter = np.zeros((p, p))
            for chunk in _normalised_chunks(train, what):
                centred = chunk - mean
                scatter += centred.T @ centred
                fourth_moment += float(((centred**2).sum(axis=1) ** 2).sum())
            eigenvalues, components = np.linalg.eigh(scatter / n)
        else:  # fewer images than dimensions: the thin SVD gives the N non-trivial directions
            centred = np.concatenate(list(_normalised_chunks(train, what))) - mean
            fourth_moment = float(((centred**2).sum(axis=1) ** 2).sum())
            _, singular, vt = np.linalg.svd(centred, full_matrices=False)
            eigenvalues, components = singular**2 / n, vt.T
        eigenvalues = np.clip(eigenvalues, 0, None)  # eigh gives tiny negatives for null directions
        mu = eigenvalues.sum() / p
        if mu <= 0:
            raise ValueError(f"{what}: all {n} normalised feature vectors are identical")
        shrinkage = _shrinkage(eigenvalues, fourth_moment, n, p)
        floor = VARIANCE_FLOOR * mu
        self._set_parameters(mean, components, np.maximum((1 - shrinkage) * eigenvalues + shrinkage * mu, floor),
                             max(shrinkage * mu, floor))
        self.shrinkage, self.train_images = shrinkage, n

    def _set_parameters(self, mean, components, variances, residual_variance) -> None:
        """Keep float32 parameters (what is saved) and their float64 copies (what scores use), so that a
        fitted density and its saved-and-loaded copy score identically."""
        self.mean, self.components = np.asarray(mean, np.float32), np.asarray(components, np.float32)
        self.variances = np.asarray(variances, np.float32)
        self.residual_variance = float(np.float32(residual_variance))
        self._scoring = (self.mean.astype(np.float64), self.components.astype(np.float64),
                         1.0 / self.variances.astype(np.float64))

    def score(self, features) -> np.ndarray:
        """(N,) Mahalanobis distances; higher = more unusual."""
        if self.mean is None:
            raise RuntimeError("FeatureDensity is not fitted: call fit() or FeatureDensity.load()")
        array = _as_array(features, "features")
        if array.shape[1] != len(self.mean):
            raise ValueError(f"features have {array.shape[1]} dimensions; the density was fitted on {len(self.mean)}")
        mean, components, inverse_variances = self._scoring
        full_rank = components.shape[1] == len(mean)
        out = []
        for chunk in _normalised_chunks(array, "features"):
            centred = chunk - mean
            # torch's matmul, not numpy's: it keeps to torch's thread count (1 in the app), where
            # numpy's OpenBLAS started threads of its own from 4 rows on and cost ~25 ms a batch
            # on 2 busy cores (10.0 -> 3.9 ms of CPU per request at batch 4, benchmarks/bench_app.py).
            inside = (torch.from_numpy(centred) @ torch.from_numpy(components)).numpy() ** 2  # (n, K)
            squared = inside @ inverse_variances
            if not full_rank:  # the part of `centred` outside the K components
                outside = np.maximum((centred**2).sum(axis=1) - inside.sum(axis=1), 0.0)
                squared += outside / self.residual_variance
            out.append(np.sqrt(squared))
        return np.concatenate(out) if out else np.zeros(0)

    def flag(self, features) -> np.ndarray:
        """(N,) bool: True where the score is above the threshold."""
        if self.threshold is None:
            raise RuntimeError("FeatureDensity has no threshold: call fit() or FeatureDensity.load()")
        return self.score(features) > self.threshold

    def score_images(self, features, pixel_values) -> np.ndarray:
        """(N,) the score of both detectors in one: the CNN features' distance, or the image
        statistics' distance rescaled so that its own threshold lands on `threshold`, whichever
        is larger. So `score_images(...) > threshold` exactly when either detector flags the
        image. `pixel_values`: the (N, 3, H, W) model inputs the features were computed from.
        Without a statistics density this is `score(features)`."""
        scores = self.score(features)
        if self.statistics is None:
            return scores
        statistics = self.statistics
        second = statistics.score(image_statistics(pixel_values, statistics.pixel_mean, statistics.pixel_std))
        if len(second) != len(scores):
            raise ValueError(f"{len(scores)} feature rows but {len(second)} images")
        return np.maximum(scores, second * (self.threshold / statistics.threshold))

    def flag_images(self, features, pixel_values) -> np.ndarray:
        """(N,) bool: True where either detector flags the image (see `score_images`)."""
        if self.threshold is None:
            raise RuntimeError("FeatureDensity has no threshold: call fit() or FeatureDensity.load()")
        return self.score_images(features, pixel_values) > self.threshold

    def save(self, folder: str | Path) -> Path:
        """Write ood.safetensors (parameters) and ood.json (threshold and facts) into `folder`."""
        if self.threshold is None:
            raise RuntimeError("FeatureDensity is not fitted: nothing to save")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"mean": self.mean, "components": self.components, "variances": self.variances,
                   "residual_variance": np.array([self.residual_variance], dtype=np.float32)}
        meta = {"version": VERSION, "method": METHOD, "feature_dim": self.feature_dim,
                "threshold": self.threshold, "false_alarm_rate": self.false_alarm_rate,
                "train_images": self.train_images, "heldout_images": self.heldout_images,
                "shrinkage": self.shrinkage}
        if self.statistics is not None:
            st = self.statistics
            tensors.update({STATISTICS_PREFIX + "mean": st.mean, STATISTICS_PREFIX + "components": st.components,
                            STATISTICS_PREFIX + "variances": st.variances,
                            STATISTICS_PREFIX + "residual_variance": np.array([st.residual_variance], np.float32)})
            meta["rule"] = "flagged when either density is above its threshold"
            meta["cross_fitted_images"] = self.cross_fitted_images
            meta["statistics"] = {"method": STATISTICS_METHOD, "feature_dim": st.feature_dim,
                                  "threshold": st.threshold, "shrinkage": st.shrinkage,
                                  "train_images": st.train_images, "pixel_mean": list(st.pixel_mean),
                                  "pixel_std": list(st.pixel_std)}
        with atomic_path(folder / TENSORS_FILE) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))
        atomic_write_text(folder / META_FILE, json.dumps(meta, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "FeatureDensity | None":
        """The density saved in `folder`; None when neither file is there. CheckpointError
        naming the file when one is missing, corrupt, of another version, or inconsistent."""
        folder = Path(folder)
        tensors_path, meta_path = folder / TENSORS_FILE, folder / META_FILE
        if not tensors_path.is_file() and not meta_path.is_file():
            return None
        for path in (tensors_path, meta_path):
            if not path.is_file():
                raise CheckpointError(f"OOD detector file missing: {path} (the other file, "
                                      f"{(meta_path if path == tensors_path else tensors_path).name}, is there)")
        meta = _read_meta(meta_path)
        try:
            tensors = load_file(str(tensors_path))
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"OOD detector tensors are corrupt: {tensors_path} ({error})") from error
        density = cls()
        density._set_parameters(*_checked_parameters(tensors, "", meta["feature_dim"], tensors_path, meta_path))
        density.threshold, density.false_alarm_rate = meta["threshold"], meta["false_alarm_rate"]
        density.train_images, density.heldout_images = meta["train_images"], meta["heldout_images"]
        density.shrinkage = meta.get("shrinkage")
        if "statistics" in meta:
            density.statistics = _load_statistics(meta, meta_path, tensors, tensors_path)
            density.cross_fitted_images = int(meta.get("cross_fitted_images", 0))
        return density


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"OOD detector settings are not valid JSON: {path} ({error})") from error
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: version {meta.get('version')!r} is not supported (this code reads {VERSION})")
    if meta.get("method") != METHOD:
        raise CheckpointError(f"{path}: method {meta.get('method')!r} is not {METHOD!r}")
    fields = {"feature_dim": int, "train_images": int, "heldout_images": int,
              "threshold": (int, float), "false_alarm_rate": (int, float)}
    for key, kind in fields.items():
        value = meta.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(f"{path}: field {key!r} is {value!r}, expected a number")
    if not np.isfinite(meta["threshold"]):
        raise CheckpointError(f"{path}: threshold is {meta['threshold']!r}, expected a finite number")
    if meta["feature_dim"] < 1 or not 0 < meta["false_alarm_rate"] < 1:
        raise CheckpointError(f"{path}: feature_dim must be >= 1 and false_alarm_rate in (0, 1)")
    meta["threshold"], meta["false_alarm_rate"] = float(meta["threshold"]), float(meta["false_alarm_rate"])
    return meta


def _checked_parameters(tensors: dict, prefix: str, p: int, tensors_path: Path, meta_path: Path) -> tuple:
    """(mean, components, variances, residual variance) of one density's tensors (names `prefix` +
    _TENSORS) for F = p features, or CheckpointError naming the file and what is wrong."""
    names = [prefix + k for k in _TENSORS]
    missing = [k for k in names if k not in tensors]
    if missing:
        raise CheckpointError(f"{tensors_path} lacks tensors {missing}")
    mean, components, variances, residual = (tensors[k] for k in names)
    k = components.shape[1] if components.ndim == 2 else -1
    if (mean.shape != (p,) or components.ndim != 2 or components.shape[0] != p or not 0 < k <= p
            or variances.shape != (k,) or residual.shape != (1,)):
        raise CheckpointError(
            f"{tensors_path} does not match {meta_path.name} (feature_dim {p}): shapes {prefix}mean {mean.shape}, "
            f"components {components.shape}, variances {variances.shape}, residual_variance {residual.shape}; "
            "expected (F,), (F, K) with 0 < K <= F, (K,), (1,)")
    for name in names:
        if not np.isfinite(tensors[name]).all():
            raise CheckpointError(f"{tensors_path}: tensor {name!r} holds NaN or infinity")
    if (variances <= 0).any() or residual[0] <= 0:
        raise CheckpointError(f"{tensors_path}: {prefix}variances must be positive")
    return mean, components, variances, residual[0]


def _load_statistics(meta: dict, meta_path: Path, tensors: dict, tensors_path: Path) -> FeatureDensity:
    """The image-statistics density saved beside the CNN one; CheckpointError naming the file."""
    info = meta["statistics"]
    if not isinstance(info, dict):
        raise CheckpointError(f"{meta_path}: field 'statistics' is {info!r}, expected an object")
    if info.get("method") != STATISTICS_METHOD:
        raise CheckpointError(f"{meta_path}: image statistics {info.get('method')!r} are not supported "
                              f"(this code computes {STATISTICS_METHOD!r})")
    for key in ("feature_dim", "train_images", "threshold"):
        value = info.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value):
            raise CheckpointError(f"{meta_path}: field 'statistics.{key}' is {value!r}, expected a number")
    if info["feature_dim"] != STATISTICS_DIM or info["threshold"] <= 0:
        raise CheckpointError(f"{meta_path}: statistics.feature_dim must be {STATISTICS_DIM} and its threshold "
                              f"positive, got {info['feature_dim']!r} and {info['threshold']!r}")
    for key in ("pixel_mean", "pixel_std"):
        value = info.get(key)
        if (not isinstance(value, list) or len(value) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in value)
                or (key == "pixel_std" and min(value) <= 0)):
            raise CheckpointError(f"{meta_path}: field 'statistics.{key}' is {value!r}, expected 3 numbers")
    statistics = FeatureDensity()
    statistics._set_parameters(*_checked_parameters(tensors, STATISTICS_PREFIX, STATISTICS_DIM, tensors_path, meta_path))
    statistics.threshold, statistics.shrinkage = float(info["threshold"]), info.get("shrinkage")
    statistics.train_images = int(info["train_images"])
    statistics.false_alarm_rate, statistics.heldout_images = meta["false_alarm_rate"], meta["heldout_images"]
    statistics.pixel_mean = tuple(float(v) for v in info["pixel_mean"])
    statistics.pixel_std = tuple(float(v) for v in info["pixel_std"])
    return statistics


def _out_of_fold_scores(train_features, train_statistics, folds: int, seed: int):
    """(CNN scores, statistics scores) of every training image, each from densities fitted on
    the other folds; None when there are too few images for `folds` folds of at least 2."""
    features = _as_array(train_features, "training features")
    statistics = _as_array(train_statistics, "training image statistics")
    n = len(features)
    if len(statistics) != n:
        raise ValueError(f"{n} training features but {len(statistics)} training image statistics")
    if folds < 2 or n < 2 * folds:
        return None
    fold = np.random.default_rng(seed).permutation(n) % folds
    first, second = np.zeros(n), np.zeros(n)
    for k in range(folds):
        inside, outside = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        for array, out in ((features, first), (statistics, second)):
            density = FeatureDensity()
            density._fit_parameters(np.asarray(array[inside]), "training features")
            out[outside] = density.score(np.asarray(array[outside]))
    return first, second
