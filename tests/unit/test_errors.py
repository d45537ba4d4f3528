from __future__ import annotations

import re

from otad import errors


def test_errors_codes_are_unique_lower_snake() -> None:
    classes = errors.all_error_classes()
    codes = [cls.code for cls in classes]
    assert len(codes) == len(set(codes)), "two error classes share a wire code"
    for code in codes:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", code), code


def test_errors_every_class_is_drawn_in_the_docstring() -> None:
    doc = errors.__doc__ or ""
    for cls in errors.all_error_classes():
        assert cls.__name__ in doc and cls.code in doc, f"{cls.__name__} missing from the tree"


def test_errors_to_wire_carries_code_and_message() -> None:
    exc = errors.Downgrade("bundle: security_version 3 is below the floor 5")
    assert exc.to_wire() == {
        "code": "bundle_downgrade",
        "message": "bundle: security_version 3 is below the floor 5",
    }
    assert isinstance(exc, errors.BundleError) and not exc.retryable
    assert errors.DownloadTimeout("x").retryable
    assert errors.ShadowVersionConflict("x").status == 409
