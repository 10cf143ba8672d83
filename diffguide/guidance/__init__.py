from diffguide.guidance.base import Guidance, GuidedPrediction

__all__ = ["Guidance", "GuidedPrediction"]
