"""The examples in the docs run and check what they claim.

Single-process pages run their ``python`` blocks top to bottom in one namespace. Each
parallel-layout page holds one script whose ``example()`` is what ``launch(example, nprocs=2)``
would run on every rank; here it runs on the forked 2-rank pool instead of fresh processes.
The ``make docs`` build itself (Sphinx with warnings as errors; every page is in a toctree
by construction, see docs/conf.py) is CI's job.
"""

import re
from pathlib import Path

import pytest
import torch.distributed as dist
from rank_pool import distributed

DOCS = Path(__file__).resolve().parent.parent / "docs"
LAYOUT_PAGES = ("ddp", "fsdp", "fairscale_tp", "dtensor_tp", "hf_tp", "megatron", "pipeline")


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S)


@pytest.mark.parametrize("page", ["quickstart.md", "hook_map.md", "layouts/single.md"])
def test_single_process_page_runs(page):
    namespace = {"__name__": "docs_example"}  # skips `if __name__ == "__main__":` launches
    for block in python_blocks(DOCS / page):
        exec(compile(block, str(DOCS / page), "exec"), namespace)


@pytest.mark.parametrize("page", LAYOUT_PAGES)
@distributed(world_size=2)
def test_layout_page_example_runs_on_two_ranks(page, tmp_path):
    (block,) = python_blocks(DOCS / "layouts" / f"{page}.md")
    namespace = {"__name__": "docs_example"}
    exec(compile(block, f"docs/layouts/{page}.md", "exec"), namespace)
    args = ()
    if page == "hf_tp":  # its __main__ saves the tiny model first
        from flex_surgery.models import tiny_hf_model

        if dist.get_rank() == 0:
            tiny_hf_model("llama").save_pretrained(tmp_path)
        dist.barrier()
        args = (str(tmp_path),)
    value = namespace["example"](*args)
    if page == "hf_tp" and dist.get_rank() == 0:
        assert value == {"model.layers.0.mlp.up_proj": (2, 8, 128),
                         "model.layers.1.mlp.up_proj": (2, 8, 128)}
