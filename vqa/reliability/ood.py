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
"""

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from ..errors import CheckpointError
from ..files import atomic_path, atomic_write_text

TENSORS_FILE = "ood.safetensors"
META_FILE = "ood.json"
VERSION = 1
METHOD = "mahalanobis-ledoit-wolf"
CHUNK_ROWS = 4096  # rows normalised at a time: a (N, F) float16 memmap is never copied whole
# Variance floor, relative to the mean variance: it only guards a division by zero when
# Ledoit-Wolf picks no shrinkage; the shrinkage it picked in every measurement above was >= 0.002.
VARIANCE_FLOOR = 1e-6
_TENSORS = ("mean", "components", "variances", "residual_variance")


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


def auroc(in_scores, out_scores) -> float:
    """P(out score > in score) + P(equal) / 2: the area under the ROC curve, from ranks.

    The Mann-Whitney U statistic over n_in * n_out, with tied scores given their mean rank.
    """
    a = np.asarray(in_scores, dtype=np.float64).ravel()
    b = np.asarray(out_scores, dtype=np.float64).ravel()
    if not len(a) or not len(b):
        raise ValueError(f"auroc needs scores on both sides, got {len(a)} in-distribution and {len(b)} out")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("auroc: scores hold NaN or infinity")
    _, inverse, counts = np.unique(np.concatenate([a, b]), return_inverse=True, return_counts=True)
    mean_ranks = np.cumsum(counts) - (counts - 1) / 2  # 1-based rank, averaged over ties
    u = mean_ranks[inverse[len(a):]].sum() - len(b) * (len(b) + 1) / 2
    return float(u / (len(a) * len(b)))


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

    @property
    def feature_dim(self) -> int | None:
        return None if self.mean is None else len(self.mean)

    def fit(self, train_features, heldout_features, false_alarm_rate: float = 0.01) -> "FeatureDensity":
        """Fit on `train_features` (N, F), then set the threshold so that a fraction of at most
        `false_alarm_rate` of `heldout_features` (in-distribution images not fitted on) is flagged."""
        if not 0 < false_alarm_rate < 1:
            raise ValueError(f"false_alarm_rate must be in (0, 1), got {false_alarm_rate}")
        train = _as_array(train_features, "training features")
        n, p = train.shape
        if n < 2:
            raise ValueError(f"training features: need at least 2 images, got {n}")
        total = np.zeros(p)
        for chunk in _normalised_chunks(train, "training features"):
            total += chunk.sum(axis=0)
        mean = total / n
        fourth_moment = 0.0
        if n >= p:  # the F x F covariance, accumulated chunk by chunk
            scatter = np.zeros((p, p))
            for chunk in _normalised_chunks(train, "training features"):
                centred = chunk - mean
                scatter += centred.T @ centred
                fourth_moment += float(((centred**2).sum(axis=1) ** 2).sum())
            eigenvalues, components = np.linalg.eigh(scatter / n)
        else:  # fewer images than dimensions: the thin SVD gives the N non-trivial directions
            centred = np.concatenate(list(_normalised_chunks(train, "training features"))) - mean
            fourth_moment = float(((centred**2).sum(axis=1) ** 2).sum())
            _, singular, vt = np.linalg.svd(centred, full_matrices=False)
            eigenvalues, components = singular**2 / n, vt.T
        eigenvalues = np.clip(eigenvalues, 0, None)  # eigh gives tiny negatives for null directions
        mu = eigenvalues.sum() / p
        if mu <= 0:
            raise ValueError(f"training features: all {n} normalised feature vectors are identical")
        shrinkage = _shrinkage(eigenvalues, fourth_moment, n, p)
        floor = VARIANCE_FLOOR * mu
        self._set_parameters(mean, components, np.maximum((1 - shrinkage) * eigenvalues + shrinkage * mu, floor),
                             max(shrinkage * mu, floor))
        self.shrinkage, self.train_images = shrinkage, n
        heldout = self.score(heldout_features)
        if not len(heldout):
            raise ValueError("held-out features: need at least 1 image to set the threshold")
        # "higher": an observed score, with at most floor(rate * n) held-out scores above it.
        self.threshold = float(np.quantile(heldout, 1 - false_alarm_rate, method="higher"))
        self.false_alarm_rate, self.heldout_images = float(false_alarm_rate), len(heldout)
        return self

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
        missing = [k for k in _TENSORS if k not in tensors]
        if missing:
            raise CheckpointError(f"{tensors_path} lacks tensors {missing}")
        p = meta["feature_dim"]
        mean, components = tensors["mean"], tensors["components"]
        variances, residual = tensors["variances"], tensors["residual_variance"]
        k = components.shape[1] if components.ndim == 2 else -1
        if (mean.shape != (p,) or components.ndim != 2 or components.shape[0] != p or not 0 < k <= p
                or variances.shape != (k,) or residual.shape != (1,)):
            raise CheckpointError(
                f"{tensors_path} does not match {meta_path.name} (feature_dim {p}): shapes mean {mean.shape}, "
                f"components {components.shape}, variances {variances.shape}, residual_variance {residual.shape}; "
                "expected (F,), (F, K) with 0 < K <= F, (K,), (1,)")
        for name in _TENSORS:
            if not np.isfinite(tensors[name]).all():
                raise CheckpointError(f"{tensors_path}: tensor {name!r} holds NaN or infinity")
        if (variances <= 0).any() or residual[0] <= 0:
            raise CheckpointError(f"{tensors_path}: variances must be positive")
        density = cls()
        density._set_parameters(mean, components, variances, residual[0])
        density.threshold, density.false_alarm_rate = meta["threshold"], meta["false_alarm_rate"]
        density.train_images, density.heldout_images = meta["train_images"], meta["heldout_images"]
        density.shrinkage = meta.get("shrinkage")
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
