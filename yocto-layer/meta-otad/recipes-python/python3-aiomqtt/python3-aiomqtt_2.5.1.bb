SUMMARY = "The idiomatic asyncio MQTT client, wrapped around paho-mqtt"
DESCRIPTION = "asyncio client for MQTT 3.1.1 and 5 built on paho-mqtt. otad keeps it behind one \
               module (otad/agent/mqtt.py) and pins it below 3.0, whose client API differs."
HOMEPAGE = "https://github.com/empicano/aiomqtt"
BUGTRACKER = "https://github.com/empicano/aiomqtt/issues"
SECTION = "devel/python"
LICENSE = "BSD-3-Clause"
LIC_FILES_CHKSUM = "file://LICENSE;md5=a462083fa4d830bdcf8c22a8ddf453cf"

SRC_URI[sha256sum] = "25a0a47d157e8f158d2da1110ea4786c0615518751e94f7b04976c977a8ff20d"

inherit pypi python_hatchling

RDEPENDS:${PN} += "python3-asyncio python3-paho-mqtt"

CVE_PRODUCT = "aiomqtt"

BBCLASSEXTEND = "native"
