"""A personal access token issued by the suite's real Label Studio 1.23 (a JWT refresh token, what its Account &
Settings page hands out by default) reaches the task images and the export through the project's one client:
the token is exchanged for an access token once, and both kinds of call carry it."""
from __future__ import annotations

import numpy as np

from ml_backend.annotations import load_label_studio_project
from ml_backend.label_studio import for_project
from ml_backend.settings import Settings
from tests import dataset
from tests.label_studio import gt_brush_results


def test_a_personal_access_token_fetches_task_images_and_the_export(label_studio, ls_project, tmp_path):
    pat = label_studio.post("/api/token/")["token"]  # issued to the suite's user (legacy token auth)
    assert pat.count(".") == 2 and pat != label_studio.token
    image_id = dataset.splits()["train"][0]
    [task] = label_studio.upload_images(ls_project, [dataset.image_path(image_id)])
    label_studio.create_annotation(task, gt_brush_results(image_id))
    settings = Settings(label_studio_url=label_studio.url, label_studio_api_key=pat, model_dir=tmp_path)
    client = for_project(settings, str(ls_project))
    try:
        assert client.token.refreshes  # a personal access token, not a legacy one
        data = load_label_studio_project(client)  # the export (REST) and the image (/data/upload/...)
    finally:
        client.close()
    [image] = data.images
    assert np.array_equal(image.load_image(), dataset.load_image(image_id))  # the pixels the user uploaded
    assert len(image.samples) == len(dataset.annotations(image_id))
