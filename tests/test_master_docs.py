"""The master's Swagger UI, loaded in headless Chromium with the network cut off, and
its spellings in memory."""

import shutil
import tempfile

from twisted.internet.defer import ensureDeferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.chromium import CHROMIUM_FLAGS, chromium
from tests.fakemaster import KEY, MemoryMaster
from tests.test_master_api import start_master


class SwaggerUI(TestCase):
    timeout = 90

    async def render(self, url):
        binary = chromium(self)
        profile = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, profile, True)
        dom, _, code = await getProcessOutputAndValue(
            binary, [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url])
        self.assertEqual(code, 0)
        return dom.decode()

    async def test_the_nodepass_dialect_docs_render_its_openapi_3_1_offline(self):
        master = await start_master(self, query="?np=/panel")
        page = await self.render(f"http://127.0.0.1:{master.port}/panel/v1/docs")
        for path in ("/panel/v1/instances", "/panel/v1/instances/{id}", "/panel/v1/tcping",
                     "/panel/v1/info", "/panel/v1/events"):
            self.assertIn(f'data-path="{path}"', page)
        self.assertIn("OAS 3.1", page)
        self.assertNotIn("Unable to render this definition", page)

    async def test_docs_render_every_route_offline(self):
        master = await start_master(self, prefix="/admin")
        page = await self.render(f"{master.base}/docs")
        for path in ("/admin/v1/instances", "/admin/v1/instances/{id}",
                     "/admin/v1/openapi.json", "/admin/v1/docs"):
            self.assertIn(f'data-path="{path}"', page)
        self.assertIn("authorize", page)  # the API key goes in through "Authorize"
        self.assertNotIn("Unable to render this definition", page)

    async def test_every_spelling_of_the_docs_renders_our_page_offline(self):
        master = await start_master(self)
        for base in (master.base, f"http://127.0.0.1:{master.port}/api/np/v1"):
            for spelling in ("docs/", "docs/index.html"):
                page = await self.render(f"{base}/{spelling}")
                self.assertIn(f'data-path="{base.split(str(master.port))[1]}/instances"',
                              page, spelling)
                self.assertNotIn("Unable to render this definition", page)


class Spellings(SynchronousTestCase):
    """Our page under every spelling of ``docs``, in both dialects; nothing else of the
    swagger-ui-py package (its stock page and initializer load the petstore example from
    the internet), and no online validator (#16 item 11)."""

    def setUp(self):
        self.master = MemoryMaster(self)

    def get(self, url, key=None, method="GET"):
        return self.successResultOf(ensureDeferred(self.master.call(method, url, key=key)))

    def test_docs_docs_slash_and_index_html_are_our_page(self):
        for base in (self.master.seed, self.master.np):
            for spelling, here in (("docs", "docs/"), ("docs/", ""), ("docs/index.html", "")):
                code, page, response = self.get(f"{base}/{spelling}")
                self.assertEqual((code, response.headers.getRawHeaders("Content-Type")),
                                 (200, ["text/html; charset=utf-8"]), spelling)
                for name in ("swagger-ui.css", "swagger-ui-bundle.js", "start.js"):
                    self.assertIn(f'"{here}{name}"', page, spelling)
                self.assertNotIn("petstore", page)
            code, script, _ = self.get(f"{base}/docs/start.js")
            self.assertEqual(code, 200)
            self.assertIn("validatorUrl: null", script)
            self.assertIn('new URL("../openapi.json", document.currentScript.src)', script)
            for name in ("swagger-ui.css", "swagger-ui-bundle.js"):
                # HEAD: a file is sent by a producer that needs a running reactor
                code, _, response = self.get(f"{base}/docs/{name}", method="HEAD")
                self.assertEqual(code, 200, name)
                self.assertGreater(int(response.headers.getRawHeaders(
                    "Content-Length")[0]), 10_000)

    def test_nothing_else_of_the_package_is_served(self):
        for base, dialect in ((self.master.seed, "seed"), (self.master.np, "np")):
            for name in ("swagger-initializer.js", "oauth2-redirect.html", "index.css",
                         "swagger-editor.js", "swagger-ui-standalone-preset.js", "x/y"):
                code, data, _ = self.get(f"{base}/docs/{name}", key=KEY)
                self.assertEqual(code, 404, name)
                if dialect == "seed":
                    self.assertEqual(data["error"]["code"], "NOT_FOUND")
                else:
                    self.assertIn("Not found", data["error"])
                self.assertEqual(self.get(f"{base}/docs/{name}")[0], 401)  # not public
