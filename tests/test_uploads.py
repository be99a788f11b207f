"""Dataset archives uploaded over the API: good ones are registered; hostile ones are refused and leave nothing."""

from __future__ import annotations

import io
import tarfile
import zipfile

import pytest
from PIL import Image

from trainyard_web import create_app

from conftest import authed_client

UPLOAD = "/api/v1/datasets/upload"


def png(shade: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (12, 12), (shade, 255 - shade, 40)).save(out, "PNG")
    return out.getvalue()


def image_folder_zip(prefix: str = "pets/") -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for cls in ("cat", "dog"):
            for i in range(6):
                zf.writestr(f"{prefix}{cls}/{i}.png", png(i * 30 + (100 if cls == "dog" else 0)))
    return out.getvalue()


def tar_with(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type = kind
    member.linkname = link
    return member


def zip_of(entries: dict[str, bytes], symlink: str | None = None) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        if symlink:
            link = zipfile.ZipInfo(symlink)
            link.external_attr = (0o120777 << 16)  # a symlink, as `zip --symlinks` stores one
            zf.writestr(link, "/etc")
    return out.getvalue()


def upload(client, data: bytes, name: str = "pets", fmt: str = "imagefolder", filename: str = "pets.zip"):
    return client.post(UPLOAD, data={"name": name, "format": fmt, "archive": (io.BytesIO(data), filename)},
                       content_type="multipart/form-data")


def uploads_dir(settings):
    folder = settings.dataset_roots[0] / "uploads"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_an_uploaded_zip_is_unpacked_and_registered(web_app, web_settings):
    member = authed_client(web_app, role="member", user="ada")
    response = upload(member, image_folder_zip())
    assert response.status_code == 201, response.get_json()
    dataset = response.get_json()
    assert dataset["classes"] == ["cat", "dog"] and dataset["num_samples"] == 12
    assert (web_settings.dataset_roots[0] / "uploads" / "pets" / "pets" / "cat" / "0.png").is_file()
    assert upload(member, image_folder_zip()).status_code == 409  # the name is taken: nothing is unpacked
    assert uploads_dir(web_settings) == ["pets"]
    tarball = tar_with(*[(info(f"flowers/{c}/{i}.png"), png(i * 20 + (90 if c == "b" else 0)))
                         for c in "ab" for i in range(5)])
    assert upload(member, tarball, name="flowers", filename="f.tar.gz").status_code == 201


ZIP_SLIP = [
    ("parent", zip_of({"pets/cat/0.png": png(1), "../../escaped.png": png(2)}), "'..'"),
    ("absolute", zip_of({"/tmp/trainyard-absolute.png": png(1)}), "absolute"),
    ("backslash", zip_of({"..\\..\\escaped.png": png(1)}), "backslash"),
    ("drive", zip_of({"C:/escaped.png": png(1)}), "absolute"),
    ("zip symlink", zip_of({"pets/cat/0.png": png(1)}, symlink="pets/dog"), "link"),
    ("tar symlink", tar_with((info("pets/cat", tarfile.SYMTYPE, "/etc"), None)), "link"),
    ("tar hardlink", tar_with((info("pets/cat/x", tarfile.LNKTYPE, "/etc/passwd"), None)), "link"),
    ("tar device", tar_with((info("pets/null", tarfile.CHRTYPE), None)), "device"),
    ("tar fifo", tar_with((info("pets/pipe", tarfile.FIFOTYPE), None)), "FIFO"),
    ("tar parent", tar_with((info("../../escaped.png"), png(3))), "'..'"),
    ("not an archive", b"just some bytes, not an archive", "not a zip or tar"),
]


@pytest.mark.parametrize("label,data,fragment", ZIP_SLIP, ids=[c[0] for c in ZIP_SLIP])
def test_hostile_archives_are_refused_and_leave_nothing(web_client, web_settings, tmp_path, label, data, fragment):
    response = upload(web_client, data, name="evil")
    assert response.status_code == 422, (label, response.get_json())
    assert fragment in response.get_json()["detail"], response.get_json()
    assert uploads_dir(web_settings) == []
    assert web_client.get("/api/v1/datasets/evil").status_code == 404
    assert not (web_settings.dataset_roots[0].parent / "escaped.png").exists()


def test_bombs_and_member_floods_are_bounded(web_settings):
    settings = web_settings.model_copy(update={"max_unpacked_bytes": 1_000_000, "max_unpacked_files": 50})
    client = authed_client(create_app(settings))
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("pets/cat/zeros.png", b"\0" * 5_000_000)  # 5 MB of zeros deflate to a few KB
    assert len(bomb.getvalue()) < 50_000
    response = upload(client, bomb.getvalue(), name="bomb")
    assert response.status_code == 422 and "more than 1000000 bytes" in response.get_json()["detail"]
    flood = zip_of({f"pets/cat/{i}.png": b"x" for i in range(60)})
    response = upload(client, flood, name="flood")
    assert response.status_code == 422 and "more than 50 entries" in response.get_json()["detail"]
    assert uploads_dir(settings) == []


def test_an_archive_that_is_not_the_named_format_registers_nothing(web_client, web_settings):
    response = upload(web_client, zip_of({"readme.txt": b"no images here"}), name="empty")
    assert response.status_code == 422
    assert uploads_dir(web_settings) == []
    assert upload(web_client, image_folder_zip(), name="Bad Name").status_code == 422
    assert upload(web_client, image_folder_zip(), fmt="no-such-format").status_code in (404, 422)
    assert uploads_dir(web_settings) == []


def test_uploads_are_for_members(web_app, web_settings):
    viewer = authed_client(web_app, role="viewer", user="vera")
    assert upload(viewer, image_folder_zip()).status_code == 403
    assert uploads_dir(web_settings) == []
