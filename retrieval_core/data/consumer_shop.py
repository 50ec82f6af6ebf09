"""Which fashion-product-small shop products count as the same kind of garment as a clothing-small consumer photo.

One explicit table, read from the photos of both datasets and the ``articleType`` counts of ``styles.csv``
(counts in the comments). A consumer class maps to every article type a shopper would call by that name;
near misses that were left out are listed in ``EXCLUDED_ARTICLE_TYPES`` with the reason, so the choice can be
argued with. All ten classes have a counterpart, so ``UNMAPPED`` is empty; it stays part of the API so that a
class without one is recorded with its reason instead of silently dropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

CONSUMER_CLASSES: tuple[str, ...] = (
    "dress",
    "hat",
    "longsleeve",
    "outwear",
    "pants",
    "shirt",
    "shoes",
    "shorts",
    "skirt",
    "t-shirt",
)

CONSUMER_TO_SHOP: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "dress": ("Dresses",),  # 422
        "hat": ("Caps", "Hat"),  # 255, 2; the consumer hats are mostly caps and beanies
        # The consumer photos are sweaters, sweatshirts, cardigans and long-sleeved tees. styles.csv files
        # long-sleeved tees under Tshirts with the short-sleeved ones, so only these two types are clean.
        "longsleeve": ("Sweatshirts", "Sweaters"),  # 256, 248
        "outwear": ("Jackets", "Rain Jacket"),  # 233, 16; coats, puffers and padded vests in the photos
        "pants": (
            "Jeans",  # 557
            "Trousers",  # 482
            "Track Pants",  # 274
            "Capris",  # 157
            "Leggings",  # 154
            "Lounge Pants",  # 56
            "Jeggings",  # 32
            "Rain Trousers",  # 2
        ),
        "shirt": ("Shirts",),  # 2888
        # The consumer shoes include sneakers, boots, heels, ballet flats, sandals and flip-flops.
        "shoes": (
            "Casual Shoes",  # 2568
            "Sports Shoes",  # 1819
            "Heels",  # 1188
            "Flip Flops",  # 827
            "Sandals",  # 809
            "Formal Shoes",  # 566
            "Flats",  # 449
            "Sports Sandals",  # 62
        ),
        "shorts": ("Shorts", "Lounge Shorts"),  # 502, 30
        "skirt": ("Skirts",),  # 115
        "t-shirt": ("Tshirts", "Lounge Tshirts"),  # 6347 (polos included), 2
    }
)

# Consumer class -> why no shop article type matches it.
UNMAPPED: Mapping[str, str] = MappingProxyType({})

# Article types that look close to a consumer class but were left out, and why.
EXCLUDED_ARTICLE_TYPES: Mapping[str, str] = MappingProxyType(
    {
        "Tops": "women's tops and blouses: the source dataset's Top and Blouse classes are not in clothing-small",
        "Kurtas": "South Asian long tunic: neither a shirt nor a dress in the consumer photos",
        "Kurtis": "South Asian short tunic, as Kurtas",
        "Tunics": "between a top and a dress; no consumer class holds them",
        "Blazers": "tailored; the source dataset has its own Blazer class, not in clothing-small",
        "Nehru Jackets": "tailored sleeveless jacket, as Blazers",
        "Waistcoat": "tailored, worn under a jacket rather than as outerwear",
        "Shrug": "a short cropped cardigan: neither longsleeve nor outwear with confidence",
        "Jumpsuit": "one piece with legs: neither dress nor pants",
        "Nightdress": "sleepwear",
        "Patiala": "South Asian bottom sold with a kurta set, usually photographed as part of it",
        "Salwar": "as Patiala",
        "Churidar": "as Patiala",
        "Salwar and Dupatta": "as Patiala",
        "Tracksuits": "jacket and pants as one product",
        "Tights": "hosiery",
        "Stockings": "hosiery",
        "Boxers": "innerwear",
        "Trunk": "innerwear",
        "Innerwear Vests": "innerwear",
        "Headband": "not a hat",
        "Booties": "baby socks (subCategory Socks), not shoes",
        "Shoe Accessories": "not shoes",
    }
)


@dataclass(frozen=True)
class ShopTypes:
    """The shop side of the consumer classes.

    Attributes:
        article_types: consumer class -> its ``articleType`` values, for the mapped classes.
        unmapped: the consumer classes with no counterpart, in ``CONSUMER_CLASSES`` order.
    """

    article_types: Mapping[str, tuple[str, ...]]
    unmapped: tuple[str, ...]

    def class_of(self) -> dict[str, str]:
        """``articleType`` -> consumer class, to label shop products with the consumer vocabulary."""
        return {t: c for c, types in self.article_types.items() for t in types}


def shop_article_types(
    mapping: Mapping[str, Sequence[str]] = CONSUMER_TO_SHOP,
    unmapped: Mapping[str, str] = UNMAPPED,
    classes: Sequence[str] = CONSUMER_CLASSES,
) -> ShopTypes:
    """Check a mapping and return the article types of every mapped class and the list of unmapped ones.

    Args:
        mapping: consumer class -> article types.
        unmapped: consumer class -> reason it has no counterpart.
        classes: every consumer class.

    Returns:
        The mapped classes (in ``classes`` order) with their article types, and the unmapped classes.

    Raises:
        ValueError: a class is neither mapped nor unmapped, or both; a name is not in ``classes``; a class
            maps to no article type; an article type belongs to two classes.
    """
    unknown = sorted((set(mapping) | set(unmapped)) - set(classes))
    if unknown:
        raise ValueError(f"not consumer classes: {unknown}")
    both = sorted(set(mapping) & set(unmapped))
    if both:
        raise ValueError(f"both mapped and unmapped: {both}")
    neither = [c for c in classes if c not in mapping and c not in unmapped]
    if neither:
        raise ValueError(f"neither mapped nor listed as unmapped: {neither}")
    owner: dict[str, str] = {}
    for c in classes:
        types = tuple(mapping.get(c, ()))
        if c in mapping and not types:
            raise ValueError(f"{c!r} maps to no article type; list it as unmapped with a reason instead")
        for t in types:
            if t in owner:
                raise ValueError(f"article type {t!r} is mapped to both {owner[t]!r} and {c!r}")
            owner[t] = c
    return ShopTypes(
        article_types=MappingProxyType({c: tuple(mapping[c]) for c in classes if c in mapping}),
        unmapped=tuple(c for c in classes if c in unmapped),
    )
