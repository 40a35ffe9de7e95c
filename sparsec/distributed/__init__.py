"""Context parallelism (spec section 9): one sequence sharded over a torch.distributed group, each rank fetching only the K/V tiles its layout touches."""
from .plan import Plan, plan

__all__ = ["Plan", "plan"]
