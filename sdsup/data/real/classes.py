"""Class names, palettes and raw-id tables of the real datasets (no TensorFlow: the registry imports this).

Where each table comes from:

* ADE20K (SceneParsing / ADEChallengeData2016, 150 classes): the names are
  the short names of the CSAIL object150 list (`data/object150_info.csv` of
  CSAILVision/semantic-segmentation-pytorch), multi-word names written with
  spaces as mmsegmentation's ADE20KDataset writes them ("chest of drawers").
  The palette is mmsegmentation's ADE20KDataset palette, the one ControlNet's
  segmentation model (sd-controlnet-seg, `annotator/uniformer`) was trained
  with; it equals CSAIL's `data/color150.mat` colour for colour. It has one
  colour twice: (140, 140, 140) is both "road" (id 6) and "skyscraper"
  (id 48). Colour -> id therefore needs a tie rule: the LOWER class id wins,
  so (140, 140, 140) reads as road. `colour_table`/`colours_to_ids` below
  apply that rule; id -> colour (drawing a layout) is unaffected.
* Cityscapes (19 train classes): the labelId -> trainId table, names and
  colours of cityscapesScripts `helpers/labels.py`; every other labelId
  (void, parking, rail track, guard rail, bridge, tunnel, polegroup,
  caravan, trailer, license plate) is ignored (255).
* COCO-Stuff (171 classes): the names of nightrome/cocostuff `labels.txt`
  (80 things, then 91 stuff), in id order. The stuffthingmaps PNGs store
  `labels.txt id - 1` (0..181, 255 unlabeled); the 11 COCO thing ids that
  have no annotations (street sign, hat, shoe, eye glasses, plate, mirror,
  window, desk, door, blender, hair brush = PNG values 11, 25, 28, 29, 44, 65,
  67, 68, 70, 82, 90) are dropped, so the remaining 171 become 0..170. The
  palette and the phrases captions use ("wall" for "wall-other") are ALDM's
  (boschresearch/ALDM `dataloader/coco_stuff.py`), which trained its COCO-Stuff
  ControlNet with them; that palette has 171 distinct colours.
* The `folder` dataset: colours from its class file, else
  `generated_palette`, a fixed deterministic one.

Raw-id tables are lookup tables (`np.int16`, index = the value in the
dataset's label PNG, -1 = a value the dataset never writes, which the
builders report as an error): `ade20k_lut`, `cityscapes_lut`,
`coco_stuff_lut`.
"""

from __future__ import annotations

import colorsys
from typing import Dict, Sequence, Tuple

import numpy as np

IGNORE_ID = 255  # every real dataset's records mark unlabelled pixels with it

Colour = Tuple[int, int, int]

# ----------------------------------------------------------------------------
# ADE20K
# ----------------------------------------------------------------------------
ADE20K_CLASSES: Tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)

ADE20K_PALETTE: Tuple[Colour, ...] = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)


def ade20k_lut() -> np.ndarray:
    """ADE20K annotation value -> class id: 0 ("other") -> ignore, 1..150 -> 0..149."""
    lut = np.full(256, -1, np.int16)
    lut[0] = IGNORE_ID
    lut[1:151] = np.arange(150)
    return lut


# ----------------------------------------------------------------------------
# Cityscapes
# ----------------------------------------------------------------------------
CITYSCAPES_CLASSES: Tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)

CITYSCAPES_PALETTE: Tuple[Colour, ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)

# labelId -> trainId of the 19 evaluated classes; the other labelIds 0..33 are ignored.
CITYSCAPES_TRAIN_IDS: Dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
    27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}


def cityscapes_lut() -> np.ndarray:
    """gtFine labelIds value -> trainId: the 19 classes, the other labelIds 0..33 and 255 (-1, license
    plate, stored as a byte) -> ignore; 34..254 are not labelIds."""
    lut = np.full(256, -1, np.int16)
    lut[0:34] = IGNORE_ID
    lut[255] = IGNORE_ID
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        lut[label_id] = train_id
    return lut


# ----------------------------------------------------------------------------
# COCO-Stuff
# ----------------------------------------------------------------------------
COCO_STUFF_CLASSES: Tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush", "banner", "blanket", "branch", "bridge", "building-other",
    "bush", "cabinet", "cage", "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes",
    "clouds", "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
    "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit",
    "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves", "light", "mat", "metal",
    "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow", "plant-other",
    "plastic", "platform", "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug",
    "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone",
    "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable", "wall-brick",
    "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other",
    "waterdrops", "window-blind", "window-other", "wood",
)

# stuffthingmaps values (labels.txt id - 1) of the COCO thing classes that were never annotated.
COCO_STUFF_UNUSED: Tuple[int, ...] = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)

# How ALDM's captions and class embeddings name the classes whose COCO-Stuff name has a "-other"/"-stuff"
# suffix or a material-first spelling; every other class is named as it is.
_COCO_STUFF_PHRASES: Dict[str, str] = {
    "building-other": "building", "ceiling-other": "ceiling", "ceiling-tile": "tile ceiling",
    "desk-stuff": "desk", "door-stuff": "door", "floor-marble": "marble floor", "floor-other": "floor",
    "floor-stone": "stone floor", "floor-tile": "tile floor", "floor-wood": "wood floor", "food-other": "food",
    "furniture-other": "furniture", "ground-other": "ground", "mirror-stuff": "mirror", "plant-other": "plant",
    "sky-other": "sky", "solid-other": "solid", "structural-other": "structural", "textile-other": "textile",
    "wall-brick": "brick wall", "wall-concrete": "concrete wall", "wall-other": "wall", "wall-panel": "panel wall",
    "wall-stone": "stone wall", "wall-tile": "tile wall", "wall-wood": "wood wall", "water-other": "water",
    "window-blind": "blind window", "window-other": "window",
}
COCO_STUFF_PHRASES: Tuple[str, ...] = tuple(_COCO_STUFF_PHRASES.get(n, n) for n in COCO_STUFF_CLASSES)

COCO_STUFF_PALETTE: Tuple[Colour, ...] = (
    (220, 20, 60), (119, 11, 32), (0, 0, 142), (0, 0, 230), (106, 0, 228), (0, 60, 100),
    (0, 80, 100), (0, 0, 70), (0, 0, 192), (250, 170, 30), (100, 170, 30), (220, 220, 0),
    (175, 116, 175), (250, 0, 30), (165, 42, 42), (255, 77, 255), (0, 226, 252), (182, 182, 255),
    (0, 82, 0), (120, 166, 157), (110, 76, 0), (174, 57, 255), (199, 100, 0), (72, 0, 118),
    (255, 179, 240), (0, 125, 92), (209, 0, 151), (188, 208, 182), (0, 220, 176), (255, 99, 164),
    (92, 0, 73), (133, 129, 255), (78, 180, 255), (0, 228, 0), (174, 255, 243), (45, 89, 255),
    (134, 134, 103), (145, 148, 174), (255, 208, 186), (197, 226, 255), (171, 134, 1), (109, 63, 54),
    (207, 138, 255), (151, 0, 95), (9, 80, 61), (84, 105, 51), (74, 65, 105), (166, 196, 102),
    (208, 195, 210), (255, 109, 65), (0, 143, 149), (179, 0, 194), (209, 99, 106), (5, 121, 0),
    (227, 255, 205), (147, 186, 208), (153, 69, 1), (3, 95, 161), (163, 255, 0), (119, 0, 170),
    (0, 182, 199), (0, 165, 120), (183, 130, 88), (95, 32, 0), (130, 114, 135), (110, 129, 133),
    (166, 74, 118), (219, 142, 185), (79, 210, 114), (178, 90, 62), (65, 70, 15), (127, 167, 115),
    (59, 105, 106), (142, 108, 45), (196, 172, 0), (95, 54, 80), (128, 76, 255), (201, 57, 1),
    (246, 0, 122), (191, 162, 208), (255, 255, 128), (147, 211, 203), (192, 96, 128), (150, 100, 100),
    (64, 0, 96), (64, 224, 128), (134, 199, 156), (192, 0, 224), (168, 171, 172), (128, 192, 128),
    (146, 139, 141), (192, 224, 128), (128, 192, 64), (192, 0, 96), (192, 96, 0), (146, 112, 198),
    (0, 128, 96), (210, 170, 100), (64, 64, 64), (208, 229, 228), (92, 136, 89), (190, 153, 153),
    (0, 128, 224), (128, 224, 0), (64, 192, 64), (128, 128, 96), (218, 88, 184), (241, 129, 0),
    (0, 64, 96), (0, 160, 128), (217, 17, 255), (128, 64, 224), (152, 251, 152), (124, 74, 181),
    (0, 64, 224), (128, 160, 128), (70, 70, 70), (128, 64, 32), (255, 228, 255), (192, 0, 128),
    (64, 192, 32), (154, 208, 0), (64, 0, 0), (64, 170, 64), (0, 32, 64), (64, 128, 128),
    (193, 0, 92), (206, 186, 171), (96, 96, 96), (76, 91, 113), (128, 96, 192), (64, 0, 128),
    (255, 180, 195), (106, 154, 176), (192, 0, 0), (230, 150, 140), (60, 143, 255), (128, 64, 128),
    (0, 114, 143), (92, 82, 55), (250, 141, 255), (192, 64, 32), (254, 212, 124), (73, 77, 174),
    (255, 160, 98), (64, 224, 64), (64, 0, 64), (255, 255, 255), (64, 96, 64), (104, 84, 109),
    (0, 192, 160), (192, 224, 64), (64, 128, 64), (209, 226, 140), (169, 164, 131), (64, 64, 192),
    (225, 199, 255), (107, 142, 35), (192, 64, 64), (137, 54, 74), (64, 32, 192), (192, 192, 192),
    (0, 64, 160), (135, 158, 223), (7, 246, 231), (107, 255, 200), (58, 41, 149), (192, 64, 128),
    (183, 121, 142), (255, 73, 97), (64, 64, 0),
)


def coco_stuff_lut() -> np.ndarray:
    """stuffthingmaps value -> class id: 0..181 without the unused ids -> 0..170 in order, the unused ids
    and 255 -> ignore; 182..254 are not COCO-Stuff values."""
    lut = np.full(256, -1, np.int16)
    used = [v for v in range(182) if v not in COCO_STUFF_UNUSED]
    lut[used] = np.arange(len(used))
    lut[list(COCO_STUFF_UNUSED)] = IGNORE_ID
    lut[255] = IGNORE_ID
    return lut


# ----------------------------------------------------------------------------
# Colours
# ----------------------------------------------------------------------------
def colour_table(palette: Sequence[Sequence[int]]) -> Dict[Colour, int]:
    """colour -> class id. A colour listed for several classes reads as the LOWEST of their ids (ADE20K's
    (140, 140, 140) -> 6 "road", not 48 "skyscraper"), so a drawn layout reads back the same however it was
    drawn for the classes that keep their colour."""
    table: Dict[Colour, int] = {}
    for class_id, colour in enumerate(palette):
        table.setdefault(tuple(int(v) for v in colour), class_id)
    return table


def colours_to_ids(rgb: np.ndarray, palette: Sequence[Sequence[int]], unknown: int = -1) -> np.ndarray:
    """[..., 3] uint8 colours -> [...] int64 class ids by `colour_table` (lowest id wins); colours not in the
    palette get `unknown`."""
    rgb = np.asarray(rgb)
    keys = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2].astype(np.int64)
    ids = np.full(keys.shape, unknown, np.int64)
    for (r, g, b), class_id in colour_table(palette).items():
        ids[keys == ((r << 16) | (g << 8) | b)] = class_id
    return ids


def generated_palette(num_classes: int) -> Tuple[Colour, ...]:
    """A fixed palette for classes that come without colours: hues a golden-ratio step apart, in three
    brightness/saturation bands; distinct, never black (black draws ignore pixels)."""
    colours, seen = [], set()
    for i in range(num_classes):
        hue = (i * 0.6180339887498949) % 1.0
        band = (i // 7) % 3
        r, g, b = colorsys.hsv_to_rgb(hue, (0.85, 0.55, 0.95)[band], (0.95, 0.8, 0.6)[band])
        colour = [int(round(v * 255)) for v in (r, g, b)]
        while tuple(colour) in seen or colour == [0, 0, 0]:  # nudge the rare collision to a free colour
            colour[i % 3] = (colour[i % 3] + 37) % 256
        seen.add(tuple(colour))
        colours.append(tuple(colour))
    return tuple(colours)
