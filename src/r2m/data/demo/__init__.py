"""The embedded benchmark (`r2m demo-data`, docs/benchmark.md): generator datasets built offline
from real photographs that installed packages ship, with documented generator-like artifacts.

- `sources`: the real photographs, the two real domains (faces, scenes) and their crops;
- `families`: the generator families (FS, FR, EFS seen; diffusion-like, inpainting-like unseen);
- `build`: writing the datasets in the data contract.

See docs/benchmark.md.
"""

from r2m.data.demo.build import DATASETS, DatasetSpec, build_dataset, build_demo_data
from r2m.data.demo.families import FAMILIES, Family
from r2m.data.demo.sources import DOMAINS, Source, domain_sources

__all__ = [
    "DATASETS",
    "DOMAINS",
    "FAMILIES",
    "DatasetSpec",
    "Family",
    "Source",
    "build_dataset",
    "build_demo_data",
    "domain_sources",
]
