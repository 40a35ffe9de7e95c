"""The layout stage: which (query tile, key tile) pairs a kernel visits, FULL or PARTIAL, on the host or the device."""
from .block import BlockLayout, DeviceLayout, TileLists
from .build import build_layout, tile_classes
from .choose import BUILDERS, LayoutRequest, device_layout, host_layout
from .placed import Placement, reindex
from .sorted import SortedOrder

__all__ = ["BUILDERS", "BlockLayout", "DeviceLayout", "LayoutRequest", "Placement", "SortedOrder", "TileLists", "build_layout", "device_layout",
           "host_layout", "reindex", "tile_classes"]
