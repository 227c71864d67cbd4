"""The public API: every name in ``hf_tae.__all__`` resolves to its module's object (the
lazy-import check lives in test_sign_model)."""

import hf_tae


def test_every_public_name_resolves_to_the_object_its_module_defines():
    import importlib

    for name, module in hf_tae._LAZY_ATTRS.items():
        assert getattr(hf_tae, name) is getattr(importlib.import_module(module), name), name
    assert set(hf_tae.__all__) == {"__version__", *hf_tae._LAZY_ATTRS}
