"""Registration backends, one module per family. Each is found through the registry in
:mod:`napari_registration.core.register` and imported only when first used."""
