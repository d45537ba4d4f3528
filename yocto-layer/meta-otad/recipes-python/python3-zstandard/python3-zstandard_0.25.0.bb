SUMMARY = "Python bindings to the Zstandard compression library"
DESCRIPTION = "C extension (with the bundled zstd sources) for Zstandard compression; otad \
               decompresses bundle payloads with it while streaming them into a slot."
HOMEPAGE = "https://github.com/indygreg/python-zstandard"
BUGTRACKER = "https://github.com/indygreg/python-zstandard/issues"
SECTION = "devel/python"
LICENSE = "BSD-3-Clause"
LIC_FILES_CHKSUM = "file://LICENSE;md5=3ae87c50fd64b6f0942823686871e758"

SRC_URI[sha256sum] = "7713e1179d162cf5c7906da876ec2ccb9c3a9dcbdffef0cc7f70c3667a205f0b"

# pyproject.toml lists cffi and packaging as build requirements; the C extension itself is
# built from the zstd sources bundled in the sdist.
DEPENDS += "python3-cffi-native python3-packaging-native"

inherit pypi python_setuptools_build_meta

CVE_PRODUCT = "zstandard"

BBCLASSEXTEND = "native"
