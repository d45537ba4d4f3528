SUMMARY = "otad reference image: a small A/B image running the otad agent"
DESCRIPTION = "core-image-minimal plus the otad agent and its configuration, with the kernel \
               inside the rootfs (so it is updated with the slot), written as an A/B wic disk \
               image and as the ext4 file system image that otad-reference-bundle signs."
SECTION = "images"
LICENSE = "MIT"

inherit core-image otad-image
