SUMMARY = "Signed otad bundle of otad-reference-image"
DESCRIPTION = "The payload is the ext4 rootfs image of otad-reference-image; devices running \
               that image install it into their inactive slot."
SECTION = "images"
LICENSE = "MIT"

inherit otad-bundle

OTAD_BUNDLE_IMAGE = "otad-reference-image"
# OTAD_BUNDLE_KEY is set by the build configuration (kas/otad-qemux86-64.yml sets the example key).
