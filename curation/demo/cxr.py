"""A PA chest X-ray phantom with findings that are really visible, and measurements that show it.

Why: the CXR expert answers 18 yes/no labels. Ground truth is only worth testing against if a
positive label has something in the pixels: a heart wider than half the chest, a fluid meniscus
at a lung base, an apex without lung markings behind a pleural line, a round opacity. Each
finding is drawn by its own pure-numpy function, and `cardiothoracic_ratio` measures the heart
from the pixels alone so a test can check the image and the label agree.

Images are (row, column) arrays as PIL saves them, 8-bit, dense = bright; PA view, so the
patient's right is on the image's left and the heart bulges to the image's right.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import binary_erosion, binary_fill_holes, distance_transform_edt, gaussian_filter

from curation.demo.identity import part_rng
from curation.demo.shapes import grid_mm, soft, soft_ellipsoid

# The 18 labels of VILA-M3's CXR expert, in its order (the labels.csv column order).
CXR_LABELS = (
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis",
    "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia",
    "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum",
)
# The findings the phantom can draw; every other label is always 0.
FINDINGS = ("Cardiomegaly", "Effusion", "Pneumothorax", "Nodule", "Consolidation", "Mass")
SIZE = 256
BLOCK = 20          # images per balanced block of the finding schedule
PER_LABEL = 7       # positives of each finding per block: 35 %
LUNG, SOFT_TISSUE, HEART, AIR = 55.0, 150.0, 162.0, 8.0
LUNG_THRESHOLD = 105.0  # between aerated lung and soft tissue, for measurements


@dataclass(frozen=True, slots=True)
class Chest:
    """Where one chest's anatomy is, in pixels: enough to draw findings and to place ROIs."""

    cx: float                 # midline column
    half_width: float         # inner thoracic half-width at its widest (T)
    cavity_cy: float          # centre row of the thoracic-cavity ellipse
    cavity_ry: float
    dome_row: dict[str, float]  # top of each hemidiaphragm, keyed "right"/"left" (patient sides)
    heart_centre: tuple[float, float]  # (row, column)
    heart_radii: tuple[float, float]   # (rows, columns)
    ctr: float                # designed cardiothoracic ratio

    def side_sign(self, side: str) -> float:
        """−1 for the patient's right (image left), +1 for the left."""
        return -1.0 if side == "right" else 1.0


@dataclass(frozen=True, slots=True)
class CxrSample:
    """One image with its labels (all 18, 0/1), patient, and where its findings were drawn."""

    image: np.ndarray
    labels: dict[str, int]
    patient_id: str
    chest: Chest
    findings: dict[str, dict[str, object]] = field(default_factory=dict)


def finding_schedule(seed: int, index: int) -> tuple[str, ...]:
    """The findings of image `index`, drawn as a balanced design per block of `BLOCK` images:
    in each block every finding is positive in exactly `PER_LABEL` images (35 %), two images
    are normal and none has more than three findings. Independent draws per image would leave
    a 16-image archive with some finding in 1 image or in 10; the design keeps every label
    learnable and testable. An image's findings depend only on (seed, index), never on how
    many images the archive has.

    Filling the images with the most room left first always succeeds here, because the
    capacities sum to exactly `PER_LABEL × len(FINDINGS)` (Gale–Ryser, as in Ryser's greedy
    construction of a 0/1 matrix with given margins).
    """
    block, slot = divmod(index, BLOCK)
    rng = part_rng(seed, "cxr", 10**6 + block)
    capacity = rng.permutation([0, 0, 1, 1, 1] + [2] * 6 + [3] * 9)  # sums to 6 findings × 7
    chosen: list[list[str]] = [[] for _ in range(BLOCK)]
    for finding in rng.permutation(FINDINGS):
        room = capacity - np.array([len(c) for c in chosen])
        order = np.lexsort((rng.random(BLOCK), -room))  # most room first, ties at random
        for s in order[:PER_LABEL]:
            chosen[s].append(str(finding))
    return tuple(f for f in FINDINGS if f in chosen[slot])


def patient_of(index: int) -> str:
    """Patient id of image `index`: every fourth image is a follow-up of the previous image's
    patient, so a per-image split would leak patients (`CXR-PT-0001`, …)."""
    return f"CXR-PT-{index - (index + 3) // 4 + 1:04d}"


def cxr_phantom(seed: int, index: int) -> CxrSample:
    """Image `index` of the archive (0-based), its labels and its geometry.

    >>> s = cxr_phantom(0, 0)
    >>> s.image.shape, s.image.dtype.name, len(s.labels)
    ((256, 256), 'uint8', 18)
    >>> (cardiothoracic_ratio(s.image) > 0.5) == bool(s.labels["Cardiomegaly"])
    True
    """
    rng = part_rng(seed, "cxr", index)
    positives = finding_schedule(seed, index)
    chest = chest_geometry(rng, cardiomegaly="Cardiomegaly" in positives)
    rows, cols = grid_mm((SIZE, SIZE), (1.0, 1.0), (0.0, 0.0))
    lungs = lung_mask(chest, rows, cols)
    img = draw_anatomy(rng, chest, rows, cols, lungs)
    findings: dict[str, dict[str, object]] = {}
    if "Pneumothorax" in positives:
        findings["Pneumothorax"] = draw_pneumothorax(rng, img, chest, rows, cols, lungs)
    img = np.where(lungs, img, np.maximum(img, _opaque(chest, rows, cols)))
    draw_bones(chest, rows, cols, img)
    for name, draw in (("Effusion", draw_effusion), ("Consolidation", draw_consolidation),
                       ("Nodule", draw_nodule), ("Mass", draw_mass)):
        if name in positives:
            findings[name] = draw(rng, img, chest, rows, cols, lungs)
    if "Cardiomegaly" in positives:
        findings["Cardiomegaly"] = {"ctr": round(chest.ctr, 3)}
    img = gaussian_filter(img, 0.8) + rng.normal(0.0, 3.0, size=img.shape).astype(np.float32)
    labels = {name: int(name in positives) for name in CXR_LABELS}
    return CxrSample(np.clip(np.rint(img), 0, 255).astype(np.uint8), labels, patient_of(index), chest, findings)


def chest_geometry(rng: np.random.Generator, *, cardiomegaly: bool) -> Chest:
    """Jittered anatomy; the heart's width is 60–68 % of the thorax with cardiomegaly and
    36–44 % without, either side of the usual 0.5 cut-off with room for measurement error."""
    half = SIZE * float(rng.uniform(0.34, 0.38))
    ctr = float(rng.uniform(0.60, 0.68) if cardiomegaly else rng.uniform(0.36, 0.44))
    cx = SIZE / 2 + float(rng.uniform(-4, 4))
    dome = SIZE * float(rng.uniform(0.68, 0.72))
    heart_rx = ctr * half
    heart_ry = heart_rx * float(rng.uniform(0.62, 0.75))
    heart_row = dome - 0.35 * heart_ry
    return Chest(cx=cx, half_width=half, cavity_cy=SIZE * 0.74, cavity_ry=SIZE * 0.64,
                 dome_row={"right": dome, "left": dome + SIZE * float(rng.uniform(0.01, 0.03))},
                 heart_centre=(heart_row, cx + 0.2 * heart_rx), heart_radii=(heart_ry, heart_rx), ctr=ctr)


def _dome(chest: Chest, cols: np.ndarray) -> np.ndarray:
    """Row of the diaphragm under each column: highest mid-hemithorax, falling laterally into
    the costophrenic angles."""
    side = np.where(cols < chest.cx, "right", "left")
    top = np.where(side == "right", chest.dome_row["right"], chest.dome_row["left"])
    u = (np.abs(cols - chest.cx) - 0.5 * chest.half_width) / (0.5 * chest.half_width)
    return top + 0.09 * SIZE * u**2


def lung_mask(chest: Chest, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Aerated lung: the thoracic cavity above the diaphragm, minus mediastinum and heart."""
    cavity = soft_ellipsoid((rows, cols), (chest.cavity_cy, chest.cx), (chest.cavity_ry, chest.half_width)) > 0.5
    below_dome = rows > _dome(chest, cols)
    return cavity & ~below_dome & ~(_opaque(chest, rows, cols) > 0)


def _opaque(chest: Chest, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Mediastinum and heart as soft-tissue density (0 elsewhere)."""
    mediastinum = np.abs(cols - chest.cx - 2.0) < (0.08 * SIZE + 0.05 * np.clip(rows - 0.3 * SIZE, 0, None))
    heart = soft_ellipsoid((rows, cols), chest.heart_centre, chest.heart_radii, edge=1.0) > 0.5
    return np.maximum(mediastinum * SOFT_TISSUE, heart * HEART).astype(np.float32)


def draw_anatomy(rng: np.random.Generator, chest: Chest, rows: np.ndarray, cols: np.ndarray, lungs: np.ndarray) -> np.ndarray:
    """Air, body, soft tissue under the diaphragm, and lungs with vascular markings that fade
    from the hila to the periphery."""
    body = soft_ellipsoid((rows, cols), (0.62 * SIZE, chest.cx), (0.78 * SIZE, chest.half_width + 0.09 * SIZE), edge=2.0)
    img = AIR + body * (SOFT_TISSUE - AIR)
    markings = gaussian_filter(rng.normal(size=(SIZE, SIZE)).astype(np.float32), 1.5)
    markings *= 9.0 / max(float(markings.std()), 1e-6)
    hilum = np.exp(-np.abs(cols - chest.cx) / (0.55 * chest.half_width)).astype(np.float32)
    lung_value = LUNG + hilum * (12.0 + np.clip(markings, -12, 18))
    return np.where(lungs, lung_value, img).astype(np.float32)


def draw_bones(chest: Chest, rows: np.ndarray, cols: np.ndarray, img: np.ndarray) -> None:
    """Rib arcs over the thoracic cavity, clavicles and the spine: faint, as on a
    well-penetrated film. Each rib is the upper arc of a wide ellipse, dropping laterally."""
    u = np.abs(cols - chest.cx) / chest.half_width
    cavity = soft_ellipsoid((rows, cols), (chest.cavity_cy, chest.cx), (chest.cavity_ry, chest.half_width * 1.04), edge=1.5)
    lateral = np.clip(u - 0.1, 0.0, None)  # ribs meet the spine behind the mediastinum
    for n in range(9):
        arc = 0.16 * SIZE + n * 0.058 * SIZE + 0.10 * SIZE * lateral**2
        img += 11.0 * soft(np.abs(rows - arc) - 2.5, 0.8) * cavity * (u > 0.1)
    for sign in (-1, 1):
        clav = soft(np.abs(rows - (0.15 * SIZE - 0.05 * SIZE * u)) - 3.0, 0.8)
        img += 30.0 * clav * ((cols - chest.cx) * sign > 0.04 * SIZE) * (u < 0.75)
    img += 18.0 * soft(np.abs(cols - chest.cx) - 0.03 * SIZE, 1.0) * (rows < chest.dome_row["right"] + 0.1 * SIZE)


def draw_pneumothorax(rng: np.random.Generator, img: np.ndarray, chest: Chest, rows: np.ndarray, cols: np.ndarray,
                      lungs: np.ndarray) -> dict[str, object]:
    """Air between lung and chest wall at the apex: no markings, darker than lung, bounded by a
    thin bright visceral pleural line that curves back to the chest wall below."""
    side = "right" if rng.random() < 0.5 else "left"
    s = chest.side_sign(side)
    on_side = (cols - chest.cx) * s > 0
    lung = lungs & on_side
    depth = distance_transform_edt(np.pad(lung, 1))[1:-1, 1:-1]  # px from the lung's edge
    apex = float(np.argwhere(lung)[:, 0].min())
    extent = float(rng.uniform(0.30, 0.42)) * SIZE  # rows covered below the apex
    rim = float(rng.uniform(10.0, 16.0)) * np.clip(1.0 - (rows - apex) / extent, 0.0, 1.0)
    outer = lung & (depth < rim) & ((cols - chest.cx) * s > 0.25 * chest.half_width)
    img[outer] = LUNG - 22.0
    line = lung & (np.abs(depth - rim) < 1.0) & (rim > 1.5) & ((cols - chest.cx) * s > 0.25 * chest.half_width)
    img[line] = LUNG + 55.0
    return {"side": side, "rows": [int(apex), int(apex + extent)], "max_depth_px": round(float(rim.max()), 1)}


def draw_effusion(rng: np.random.Generator, img: np.ndarray, chest: Chest, rows: np.ndarray, cols: np.ndarray,
                  lungs: np.ndarray) -> dict[str, object]:
    """Fluid at one lung base with a meniscus climbing laterally: the costophrenic angle is
    blunted and filled with soft-tissue density. Kept to the lateral 60 % of the hemithorax,
    a small-to-moderate effusion, so the heart border stays measurable."""
    side = "right" if rng.random() < 0.5 else "left"
    s = chest.side_sign(side)
    u = np.clip((cols - chest.cx) * s / chest.half_width, -1.0, 1.2)
    height = float(rng.uniform(0.07, 0.13)) * SIZE
    level = _dome(chest, cols) - height * (0.25 + 0.75 * u**2)
    cavity = soft_ellipsoid((rows, cols), (chest.cavity_cy, chest.cx), (chest.cavity_ry, chest.half_width)) > 0.5
    fluid = soft(level - rows, 2.0) * soft(0.4 - u, 0.04) * cavity
    img += fluid * (SOFT_TISSUE - 5.0 - img) * (fluid > 0.02)
    return {"side": side, "height_px": round(height, 1)}


def _lateral_spot(rng: np.random.Generator, chest: Chest, lungs: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                  radius: float, zone: tuple[float, float]) -> tuple[str, float, float]:
    """A centre in the lateral half of a lung, within rows `zone` (fractions of the image), far
    enough inside the lung for `radius`: findings there stay off the heart border, so they
    never change the measured cardiothoracic ratio."""
    side = "right" if rng.random() < 0.5 else "left"
    s = chest.side_sign(side)
    depth = distance_transform_edt(np.pad(lungs, 1))[1:-1, 1:-1]
    ok = (depth > radius + 2) & ((cols - chest.cx) * s > 0.55 * chest.half_width)
    ok &= (rows > zone[0] * SIZE) & (rows < zone[1] * SIZE)
    spots = np.argwhere(ok)
    if len(spots) == 0:  # a very small lung: fall back to the deepest lateral point
        spots = np.argwhere(depth == depth[(cols - chest.cx) * s > 0.55 * chest.half_width].max())
    r, c = spots[rng.integers(len(spots))]
    return side, float(r), float(c)


def draw_nodule(rng: np.random.Generator, img: np.ndarray, chest: Chest, rows: np.ndarray, cols: np.ndarray,
                lungs: np.ndarray) -> dict[str, object]:
    """A small round soft-tissue opacity (8–14 px across, ~1–1.5 cm at a 35 cm field)."""
    radius = float(rng.uniform(4.0, 7.0))
    side, r, c = _lateral_spot(rng, chest, lungs, rows, cols, radius, (0.25, 0.6))
    img += 65.0 * soft_ellipsoid((rows, cols), (r, c), (radius, radius), edge=0.8)
    return {"side": side, "centre_rc": [int(r), int(c)], "radius_px": round(radius, 1)}


def draw_mass(rng: np.random.Generator, img: np.ndarray, chest: Chest, rows: np.ndarray, cols: np.ndarray,
              lungs: np.ndarray) -> dict[str, object]:
    """A large lobulated opacity (> 3 cm) in an upper zone."""
    radius = float(rng.uniform(12.0, 18.0))
    side, r, c = _lateral_spot(rng, chest, lungs, rows, cols, radius * 1.1, (0.22, 0.5))
    blob = soft_ellipsoid((rows, cols), (r, c), (radius, radius * 0.85), edge=1.5)
    blob = np.maximum(blob, soft_ellipsoid((rows, cols), (r + 0.5 * radius, c + 0.3 * radius), (0.6 * radius,) * 2, edge=1.5))
    img += 80.0 * blob * lungs
    return {"side": side, "centre_rc": [int(r), int(c)], "radius_px": round(radius, 1)}


def draw_consolidation(rng: np.random.Generator, img: np.ndarray, chest: Chest, rows: np.ndarray, cols: np.ndarray,
                       lungs: np.ndarray) -> dict[str, object]:
    """A patchy, ill-defined opacity filling part of a lobe, with darker air-bronchogram gaps."""
    radius = float(rng.uniform(14.0, 22.0))
    side, r, c = _lateral_spot(rng, chest, lungs, rows, cols, radius + 1.0, (0.3, 0.58))
    region = soft_ellipsoid((rows, cols), (r, c), (radius, radius * 0.8), edge=4.0)
    patches = gaussian_filter(rng.normal(size=(SIZE, SIZE)).astype(np.float32), 3.0)
    patches = np.clip(patches / max(float(patches.std()), 1e-6) + 0.8, 0.0, 1.0)
    img += 70.0 * region * patches * lungs
    return {"side": side, "centre_rc": [int(r), int(c)], "radius_px": round(radius, 1)}


def cardiothoracic_ratio(image: np.ndarray) -> float:
    """Heart width over thoracic width, measured from the pixels alone.

    Lung is what is darker than `LUNG_THRESHOLD` after smoothing, inside the body, with holes
    (nodules, masses) filled as a reader's eye fills them. The thoracic width is the widest
    span from one lung's outer edge to the other's. The heart width is the widest gap between
    the two lungs' medial edges, counted only in rows where the tissue bounding the gap on both
    sides goes on upwards (heart or mediastinum): below the dome tops the gap would otherwise
    run across the diaphragm, whose edge has lung above it.

    >>> 0.3 < cardiothoracic_ratio(cxr_phantom(0, 0).image) < 0.8
    True
    """
    smooth = gaussian_filter(image.astype(np.float32), 2.0)
    body = smooth > (AIR + SOFT_TISSUE) / 2
    inside = np.maximum.accumulate(body, axis=1) & np.maximum.accumulate(body[:, ::-1], axis=1)[:, ::-1]
    inside = binary_erosion(inside, iterations=4)  # off the skin edge, whose blur is lung-dark
    lung = binary_fill_holes((smooth < LUNG_THRESHOLD) & inside)
    mid, up, step_in = image.shape[1] // 2, 4, 3
    thorax, heart = 0, 0
    for r, row in enumerate(lung):
        left, right = np.flatnonzero(row[:mid]), np.flatnonzero(row[mid:]) + mid
        if len(left) < 5 or len(right) < 5:
            continue
        thorax = max(thorax, int(right[-1] - left[0]))
        a, b = int(left[-1]), int(right[0])  # the two medial lung edges
        if r >= up and b - a > 2 * step_in and not lung[r - up, a + step_in] and not lung[r - up, b - step_in]:
            heart = max(heart, b - a - 1)
    return heart / thorax if thorax else 0.0


def costophrenic_density(image: np.ndarray, chest: Chest, side: str) -> float:
    """Mean pixel value in the lateral costophrenic angle of one lung (`side`: the patient's
    "right" or "left"): aerated lung (dark) when the angle is sharp, fluid (bright) when an
    effusion blunts it."""
    s = chest.side_sign(side)
    dome = chest.dome_row[side]
    r0, r1 = int(dome - 0.02 * SIZE), int(dome + 0.02 * SIZE)
    c0, c1 = sorted(int(chest.cx + s * f * chest.half_width) for f in (0.84, 0.96))
    return float(image[r0:r1, c0:c1].mean())


def apical_air_pixels(image: np.ndarray, chest: Chest, side: str) -> int:
    """Pixels in the upper half of one hemithorax darker than any aerated lung (air without
    lung markings): near zero normally, a crescent's worth with a pneumothorax."""
    smooth = gaussian_filter(image.astype(np.float32), 1.0)
    s = chest.side_sign(side)
    rows, cols = np.mgrid[: image.shape[0], : image.shape[1]]
    cavity = ((rows - chest.cavity_cy) / chest.cavity_ry) ** 2 + ((cols - chest.cx) / chest.half_width) ** 2 < 0.95
    region = cavity & ((cols - chest.cx) * s > 0) & (rows < chest.cavity_cy - 0.3 * chest.cavity_ry)
    return int((smooth[region] < LUNG - 10.0).sum())
