"""Reference numbers from ../shared/REFERENCE.md: the paper (CaiT per category) and peers."""

from __future__ import annotations

MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
                    "screw", "tile", "toothbrush", "transistor", "wood", "zipper")

# category: (image AUROC paper, image AUROC seed impl., pixel AUROC paper, pixel AUROC seed impl.) — CaiT
CAIT_PER_CATEGORY = {
    "bottle": (1.000, 1.000, .977, .983), "cable": (1.000, .919, .984, .977),
    "capsule": (1.000, .977, .991, .991), "carpet": (1.000, 1.000, .994, .995),
    "grid": (.997, .998, .983, .978), "hazelnut": (1.000, 1.000, .991, .991),
    "leather": (1.000, 1.000, .995, .995), "metal_nut": (1.000, .998, .985, .980),
    "pill": (.994, .992, .992, .989), "screw": (.978, .846, .994, .992),
    "tile": (1.000, .999, .963, .966), "toothbrush": (.944, .872, .989, .987),
    "transistor": (.998, .965, .973, .944), "wood": (1.000, .987, .970, .959),
    "zipper": (.995, .942, .987, .978),
}

# backbone preset: (image AUROC, pixel AUROC) means over the 15 categories; None where not reported
PAPER_MEANS = {"resnet18": (.979, .972), "wide_resnet50_2": (None, .981), "deit": (None, .981), "cait": (.994, .985)}
ANOMALIB_MEANS = {"resnet18": (.907, .968), "wide_resnet50_2": (.963, .979), "deit": (.925, .975), "cait": (.944, .980)}

# anomalib's published FastFlow tables (src/anomalib/models/image/fastflow/README.md, seed 0, early stopping with
# patience 3 on the test set), per category: {backbone preset: (image AUROC, pixel AUROC)}
ANOMALIB_BACKBONES = ("resnet18", "wide_resnet50_2", "deit", "cait")
ANOMALIB_PER_CATEGORY = {category: dict(zip(ANOMALIB_BACKBONES, zip(image, pixel))) for category, image, pixel in (
    ("bottle", (1.000, 1.000, .905, .986), (.983, .986, .991, .984)),
    ("cable", (.891, .962, .942, .839), (.954, .972, .973, .981)),
    ("capsule", (.900, .963, .819, .913), (.985, .990, .979, .991)),
    ("carpet", (.979, .994, .999, 1.000), (.983, .991, .991, .992)),
    ("grid", (.988, 1.000, .991, .979), (.985, .992, .980, .979)),
    ("hazelnut", (.846, .994, .900, .948), (.953, .980, .989, .993)),
    ("leather", (1.000, .999, .999, .991), (.996, .996, .995, .996)),
    ("metal_nut", (.963, .995, .911, .963), (.972, .988, .978, .973)),
    ("pill", (.916, .942, .910, .916), (.972, .976, .985, .992)),
    ("screw", (.521, .839, .705, .791), (.926, .966, .945, .979)),
    ("tile", (.967, 1.000, .993, .998), (.944, .966, .951, .960)),
    ("toothbrush", (.844, .836, .850, .886), (.979, .980, .985, .992)),
    ("transistor", (.938, .979, .993, .983), (.964, .971, .949, .960)),
    ("wood", (.978, .992, .979, .989), (.956, .941, .952, .954)),
    ("zipper", (.878, .951, .981, .977), (.965, .985, .978, .979)))}


def anomalib_best(category: str, metric: str) -> tuple[float, str] | None:
    """anomalib's best published `image_auroc` or `pixel_auroc` for an MVTec AD category, and its backbone."""
    if category not in ANOMALIB_PER_CATEGORY:
        return None
    index = ("image_auroc", "pixel_auroc").index(metric)
    backbone, values = max(ANOMALIB_PER_CATEGORY[category].items(), key=lambda item: item[1][index])
    return values[index], backbone


def paper_numbers(category: str) -> dict[str, float] | None:
    """The paper's (CaiT) image/pixel AUROC for an MVTec AD category, else None."""
    if category not in CAIT_PER_CATEGORY:
        return None
    image, seed_image, pixel, seed_pixel = CAIT_PER_CATEGORY[category]
    return {"image_auroc": image, "pixel_auroc": pixel, "seed_image_auroc": seed_image, "seed_pixel_auroc": seed_pixel}
