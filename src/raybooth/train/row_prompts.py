"""The prompt of each row of a batch: on an instance row, the prompt of the photo it shows (its
caption, or --instance_prompt: files/captions.py), on a class row the class prompt. The distinct
prompts' ids are held once on the device and a batch's rows gathered from them by host-side
indices, so that no step waits on the GPU; every prompt is padded to one length, so batches keep
one shape and the CUDA-graph step replays them all. With --pre_compute_text_embeddings each
distinct prompt is encoded once."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch


class RowPrompts:
    def __init__(self, photo_ids: list[np.ndarray], class_ids: np.ndarray, device: torch.device):
        table: dict[bytes, int] = {}  # one row of `ids` per distinct prompt (ids of one shape and dtype)
        distinct: list[np.ndarray] = []

        def row(ids: np.ndarray) -> int:
            if ids.tobytes() not in table:
                table[ids.tobytes()] = len(distinct)
                distinct.append(ids)
            return table[ids.tobytes()]

        self.photo_rows = [row(ids) for ids in photo_ids]
        self.class_row = row(class_ids)
        self.ids = torch.from_numpy(np.stack(distinct)).to(device)  # (prompts, tokens); SDXL's (prompts, 2, tokens)
        self.embeds: torch.Tensor | None = None  # the text encoders' output for `ids`, when encoded once
        self.pooled: torch.Tensor | None = None  # with it, SDXL's pooled embedding
        # Without captions every batch has the same rows: they are gathered once and shared, as
        # the one prompt pair was before captions.
        self.same_rows = len(set(self.photo_rows)) <= 1
        self._shared: dict | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def of(self, photos: list[int]) -> dict[str, torch.Tensor | None]:
        """Batch's prompt_ids, prompt_embeds and pooled_embeds, for a micro-batch whose instance
        rows show `photos` (indices) and whose class rows follow, as many."""
        if self._shared is not None:
            return self._shared
        rows = [self.photo_rows[photo] for photo in photos] + [self.class_row] * len(photos)

        def gather(table: torch.Tensor | None) -> torch.Tensor | None:
            # Host ints index the device tensor: an index tensor copied in would wait on the GPU.
            return None if table is None else torch.stack([table[row] for row in rows])

        gathered = {"prompt_ids": gather(self.ids), "prompt_embeds": gather(self.embeds),
                    "pooled_embeds": gather(self.pooled)}
        if self.same_rows:
            self._shared = gathered
        return gathered

    def encode_once(self, encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]) -> int:
        """Encode each distinct prompt once (`encode`: ids to hidden states and pooled embedding);
        batches take their rows' from then on. Returns how many prompts it encoded."""
        self.embeds, self.pooled = encode(self.ids)
        self._shared = None
        return len(self)
