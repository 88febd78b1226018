"""Search strategies: each class holds its settings and its rules (`Strategy`); the loop that
runs them is `ttc_fast.search`. A new strategy is one class in one file here, and one entry in
`STRATEGIES`."""
from .adaptive import AdaptiveMajority, AdaptiveWeighted
from .base import SEARCH_SAMPLING, STEP_DELIMITER, Strategy
from .beam_search import BeamSearch
from .best_of_n import BestOfN, MajorityVote, WeightedBestOfN
from .dvts import DVTS
from .early_reject import EarlyReject
from .particle_filtering import ParticleFiltering
from .rebase import Rebase
from .routed import Routed

STRATEGIES = {cls.__name__: cls for cls in (BestOfN, MajorityVote, WeightedBestOfN, BeamSearch, DVTS, ParticleFiltering,
                                             Rebase, EarlyReject, AdaptiveMajority, AdaptiveWeighted, Routed)}

__all__ = ["SEARCH_SAMPLING", "STEP_DELIMITER", "STRATEGIES", "Strategy", "BestOfN", "MajorityVote", "WeightedBestOfN",
           "BeamSearch", "DVTS", "ParticleFiltering", "Rebase", "EarlyReject", "AdaptiveMajority", "AdaptiveWeighted",
           "Routed"]
