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


def paper_numbers(category: str) -> dict[str, float] | None:
    """The paper's (CaiT) image/pixel AUROC for an MVTec AD category, else None."""
    if category not in CAIT_PER_CATEGORY:
        return None
    image, seed_image, pixel, seed_pixel = CAIT_PER_CATEGORY[category]
    return {"image_auroc": image, "pixel_auroc": pixel, "seed_image_auroc": seed_image, "seed_pixel_auroc": seed_pixel}
