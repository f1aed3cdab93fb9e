# ---------------------------------------------------------------------------
# Real Label Studio (1.23.2) end-to-end fixtures -- see tests/label_studio.py
# ---------------------------------------------------------------------------
from typing import Iterator

import pytest

from tests.label_studio import SAM_LABEL_CONFIG, LabelStudioError, LabelStudioServer, start_label_studio


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """One real Label Studio per pytest session on a free 127.0.0.1 port (fails if not installed)."""
    try:
        with start_label_studio(tmp_path_factory.mktemp("label-studio-data")) as server:
            yield server
    except LabelStudioError as e:
        raise pytest.fail.Exception(f"could not start Label Studio: {e}", pytrace=False) from None


@pytest.fixture
def ls_project(label_studio: LabelStudioServer, request: pytest.FixtureRequest) -> int:
    """A fresh project (SAM_LABEL_CONFIG: box/mask/"nucleus") on the session server."""
    return label_studio.create_project(f"e2e {request.node.name}"[:50], SAM_LABEL_CONFIG)
# --------------------------- end Label Studio fixtures ---------------------


# ---------------------------------------------------------------------------
# Model fixtures: the real offline default weights, loaded once per session
# ---------------------------------------------------------------------------
from trainer.models import LoadedModel, load_model  # noqa: E402
from trainer.runtime import Segmenter  # noqa: E402


@pytest.fixture(scope="session")
def lite_medsam() -> LoadedModel:
    return load_model("lite_medsam")


@pytest.fixture(scope="session")
def segmenter(lite_medsam: LoadedModel) -> Segmenter:
    return Segmenter(lite_medsam)
