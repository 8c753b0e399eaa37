"""How big each stage of the demo is: the full loop sized for ~15 minutes on 2 CPU cores, and a tiny one for tests."""

from __future__ import annotations

from dataclasses import dataclass

# Issue 2's recipe, the base model's: 64 px triples the steps that fit on 2 CPU cores compared with 112 px, and
# CosFace at s=32 learns from scratch on ~6k images where ArcFace at s=64, m=0.5 stalls near chance.
RECIPE = ("model=mobilefacenet", "model.input_size=64", "head=cosface", "head.s=32", "head.m3=0.35")


@dataclass(frozen=True)
class Profile:
    """Sizes per stage. Steps are global batches of `batch_size`; the base model trains on 2 ranks."""

    name: str
    # Data: identities of the training set held out of the base model, their photos dealt over albums.
    held_out_identities: int
    photos_per_identity: int
    albums: int
    split_identities: int  # held-out people whose photos are spread over two albums: cross-album merges
    base_identities: int | None  # of the others, how many the base model trains on (None: all)
    base_photos_per_identity: int | None  # and how many of each one's photos (None: all); each is aligned first
    pairs_per_fold: int  # LFW pairs kept per fold and half (matched, mismatched) for every evaluation
    # Training.
    model: tuple[str, ...]  # overrides on top of RECIPE for every model of the loop (teachers)
    student: tuple[str, ...]  # the distilled student's backbone
    batch_size: int
    base_steps: int
    sweep: str  # one Hydra sweep override; each point fine-tunes the champion on 1 core, both points at once
    sweep_steps: int
    distill_steps: int
    calibration_images: int  # int8 calibration faces drawn evenly from the union training set

    @property
    def sweep_key(self) -> str:
        """The config key the sweep varies, e.g. optim.lr."""
        return self.sweep.split("=", 1)[0]

    def __post_init__(self) -> None:
        if self.split_identities > self.held_out_identities or self.albums < 2:
            raise ValueError("a profile needs >= 2 albums and at most held_out_identities split identities")
        if min(self.held_out_identities, self.photos_per_identity, self.pairs_per_fold) < 2:
            raise ValueError("a profile needs >= 2 held-out identities, photos per identity and pairs per fold")
        caps = [cap for cap in (self.base_identities, self.base_photos_per_identity) if cap is not None]
        if min(caps, default=2) < 2:
            raise ValueError("a profile needs >= 2 base identities and base photos per identity (or None: all)")


FULL = Profile(
    name="full",
    held_out_identities=30,  # 240 photos: a label round takes ~10 s
    photos_per_identity=8,
    albums=3,
    split_identities=10,
    base_identities=None,  # all 269 others, 5,623 photos: aligned in ~1 minute (110 img/s), then cached
    base_photos_per_identity=None,
    pairs_per_fold=150,  # 3,000 LFW pairs: half the embedding time of all 6,000, and still >1,000 impostor pairs
    model=(),
    student=("model.width=0.5",),  # a quarter of the teacher's MACs (docs/benchmarks.md, distillation)
    batch_size=64,
    base_steps=600,  # ~0.4 s a step on 2 ranks: 4 minutes, 5 with evaluation
    sweep="optim.lr=0.02,0.005",  # fine-tuning rates: the fresh head must not wreck the champion's features
    # ~1.2 s a step per point on 1 core: 5 minutes. 120 steps after 500 base ones gained 0.9 points of LFW and
    # no clustering; the loop is where the champion keeps learning, so it gets a larger share of the budget.
    sweep_steps=375,
    distill_steps=150,
    calibration_images=128,
)

TINY = Profile(
    name="tiny",
    held_out_identities=6,
    photos_per_identity=4,
    albums=2,
    split_identities=2,
    base_identities=8,  # 24 photos: the alignment path in seconds
    base_photos_per_identity=3,
    pairs_per_fold=4,
    model=("model.width=0.25", "model.input_size=56", "model.embedding_dim=32"),
    student=("model.width=0.25", "model.embedding_dim=16"),
    batch_size=16,
    base_steps=6,
    sweep="optim.lr=0.02,0.005",
    sweep_steps=3,
    distill_steps=3,
    calibration_images=8,
)

PROFILES = {profile.name: profile for profile in (FULL, TINY)}
