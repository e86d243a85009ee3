"""The demo page (`python -m sdsup.demo`): its logic without a browser, then the whole flow in headless Chromium.

The browser test drives Debian's `chromium` through its `chromedriver` (selenium, pointed at both, so nothing
downloads a browser) on the shared smoke workdir: prompt -> layout -> a painted stroke -> images, and checks
what the page shows and what it sent. It skips, saying why, without Chromium (`.ci/run` installs it).
Screenshots go to the test's temporary folder; SDSUP_DEMO_SCREENSHOTS=DIR also writes them there (docs/demo/).
"""

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request

import jax
import numpy as np
import pytest
from PIL import Image

import smoke_workdir
from sdsup.data import pipeline, registry, scenes
from sdsup.demo import commands, layouts
from sdsup.demo import engine as engine_lib
from sdsup.demo import server as server_lib

try:  # the browser test skips without selenium; everything else here runs
    from selenium import webdriver
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    webdriver = None

SPEC = registry.get("scenes")
SIZE = 32
PROMPT = "sky over grass. a house on the left."
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _example_label(size=SIZE):
    return scenes.make_example(0, "test", 3, size)["label"]


# ------------------------------------------------------------------------------------------ layouts
def test_class_table_is_the_palette_with_names_and_ignore_last():
    table = layouts.class_table(SPEC)
    assert [row["name"] for row in table[:-1]] == list(SPEC.class_names)
    assert table[2]["colour"] == layouts.hex_colour(SPEC.palette[2])
    assert table[-1]["id"] == SPEC.ignore_id and table[-1]["colour"] == "#000000"


def test_ids_round_trip_and_bad_ids_are_one_line_errors():
    ids = _example_label()
    assert np.array_equal(layouts.decode_ids(layouts.encode_ids(ids), SIZE, SPEC), ids)
    with pytest.raises(layouts.DemoError, match="has 16 pixels; this model needs 32x32"):
        layouts.decode_ids(layouts.encode_ids(ids[:4, :4]), SIZE, SPEC)
    bad = ids.copy()
    bad[0, 0] = 40
    with pytest.raises(layouts.DemoError, match=r"ids \[40\] outside the 13 classes"):
        layouts.decode_ids(layouts.encode_ids(bad), SIZE, SPEC)
    with pytest.raises(layouts.DemoError, match="not base64"):
        layouts.decode_ids("not base64!", SIZE, SPEC)
    with pytest.raises(layouts.DemoError, match="the layout is empty"):
        layouts.check_labelled(np.full((SIZE, SIZE), SPEC.ignore_id, np.uint8), SPEC)


def test_a_palette_png_of_another_size_is_resized_nearest_with_a_note():
    ids = _example_label()
    ids[:4] = SPEC.ignore_id  # black reads back as ignore
    big = np.repeat(np.repeat(layouts.palette_image(ids, SPEC), 2, 0), 2, 1)  # 64x64, each pixel doubled
    upload = layouts.read_layout_upload("C:\\maps\\my map.png", _png(big), SPEC, SIZE)
    assert np.array_equal(upload.array, ids)
    assert upload.notes == ["my_map.png is 64x64: resized to 32x32 (nearest neighbour)"]
    same = layouts.read_layout_upload("map.png", _png(layouts.palette_image(ids, SPEC)), SPEC, SIZE)
    assert np.array_equal(same.array, ids) and same.notes == []


def test_colours_outside_the_palette_are_an_error_or_snapped():
    rgb = layouts.palette_image(_example_label(), SPEC).copy()
    rgb[5, 7] = (250, 2, 3)  # an anti-aliased edge, say
    with pytest.raises(layouts.DemoError) as error:
        layouts.read_layout_upload("edited.png", _png(rgb), SPEC, SIZE)
    message = str(error.value)
    assert "edited.png: colour (250, 2, 3) at (5, 7) is not in the scenes palette" in message
    assert "snap colours" in message and "/tmp" not in message and "\n" not in message
    upload = layouts.read_layout_upload("edited.png", _png(rgb), SPEC, SIZE, snap=True)
    assert upload.notes == ["1 pixels of edited.png were not palette colours: snapped to the nearest class colour"]
    nearest = int(np.argmin(((SPEC.palette_array.astype(int) - (250, 2, 3)) ** 2).sum(1)))
    assert upload.array[5, 7] == nearest


def test_id_pngs_and_npy_uploads_and_what_is_refused():
    ids = _example_label()
    assert np.array_equal(layouts.read_layout_upload("ids.png", _png(ids), SPEC, SIZE).array, ids)
    upload = layouts.read_layout_upload("ids.npy", _npy(ids[::2, ::2].astype(np.int64)), SPEC, SIZE)
    assert upload.array.shape == (SIZE, SIZE) and upload.notes[0].startswith("ids.npy is 16x16: resized to 32x32")
    with pytest.raises(layouts.DemoError, match="expected a .png"):
        layouts.read_layout_upload("map.jpg", b"...", SPEC, SIZE)
    with pytest.raises(layouts.DemoError, match="cannot read layout broken.png"):
        layouts.read_layout_upload("broken.png", b"not a png", SPEC, SIZE)
    with pytest.raises(layouts.DemoError, match="floats.npy holds float32 values"):
        layouts.read_layout_upload("floats.npy", _npy(np.zeros((SIZE, SIZE), np.float32)), SPEC, SIZE)
    with pytest.raises(layouts.DemoError, match="empty.png is empty"):
        layouts.read_layout_upload("empty.png", b"", SPEC, SIZE)


def test_a_photo_is_resized_as_the_dataset_images_are():
    photo = np.random.default_rng(0).integers(0, 255, (60, 90, 3), np.uint8)
    upload = layouts.read_photo("cat.jpg", _png(photo), pipeline.Geometry(SIZE))
    assert upload.array.shape == (SIZE, SIZE, 3) and "stretched to 32x32" in upload.notes[0]
    exact = layouts.read_photo("scene.png", _png(photo[:SIZE, :SIZE]), pipeline.Geometry(SIZE))
    assert np.array_equal(exact.array, photo[:SIZE, :SIZE]) and exact.notes == []
    with pytest.raises(layouts.DemoError, match="cannot read photo x.png"):
        layouts.read_photo("x.png", b"garbage", pipeline.Geometry(SIZE))


def test_agreement_is_the_image_miou_of_one_image():
    layout = _example_label()
    perfect = layouts.agreement(layout, layout, SPEC)
    assert perfect["miou"] == 1.0 and perfect["pixel_accuracy"] == 1.0
    ignored = layout.copy()
    ignored[:, :SIZE // 2] = SPEC.ignore_id  # ignore pixels count for nothing, whatever the reading says
    reading = layout.copy()
    reading[:, :SIZE // 2] = 0
    assert layouts.agreement(reading, ignored, SPEC)["miou"] == 1.0
    wrong = layouts.agreement(np.full_like(layout, 12), layout, SPEC)
    assert wrong["miou"] < 0.2 and set(wrong["per_class_iou"]) >= {"rock"}


# ------------------------------------------------------------------------------------------ commands
def test_commands_quote_the_prompt_and_write_every_setting():
    request = commands.ImageRequest("it's a \"house\"; rm -rf ~", 3, 2, 10, 2.5, "ddim")
    command = commands.images_command("/w d", "/o", request, "/r/layout.npy")
    flags = commands.parse_flags(command)
    assert flags == {"workdir": "/w d", "prompt": "it's a \"house\"; rm -rf ~", "layout": "/r/layout.npy",
                     "seed": "3", "num_samples": "2", "steps": "10", "guidance": "2.5", "solver": "ddim", "out": "/o"}
    assert "--layout" not in commands.images_command("/w", "/o", request, None)
    sampled = commands.LayoutRequest("a", 4, "sample", 8, 0.7, 2.0)
    assert commands.parse_flags(commands.layout_command("/w", "/o", sampled)) == {
        "workdir": "/w", "prompt": "a", "layout_only": True, "seed": "4", "layout_mode": "sample",
        "layout_steps": "8", "layout_temperature": "0.7", "layout_guidance": "2.0", "out": "/o"}
    most_probable = commands.layout_command("/w", "/o", commands.LayoutRequest("a", 4, "map", 8, 0.7, 2.0))
    assert "--layout_mode=map" in most_probable and "layout_steps" not in most_probable


def test_page_values_are_checked_with_one_line_errors():
    assert engine_lib._integer("7", "seed", 0, 10) == 7 and engine_lib._integer(3.0, "seed", 0, 10) == 3
    for bad in (2.5, "x", None, True, 11):
        with pytest.raises(layouts.DemoError, match="seed must"):
            engine_lib._integer(bad, "seed", 0, 10)
    assert engine_lib._real("2.5", "guidance", 0, 100) == 2.5
    for bad in ("nan", float("inf"), -1, "abc"):
        with pytest.raises(layouts.DemoError, match="guidance must"):
            engine_lib._real(bad, "guidance", 0, 100)
    with pytest.raises(layouts.DemoError, match="the prompt is empty"):
        engine_lib.check_prompt("   ")


def _argv(flags: dict) -> list:
    return [f"--{name}" if value is True else f"--{name}={value}" for name, value in flags.items()]


# ------------------------------------------------------------------------------------------ the entry point
def test_the_entry_point_serves_the_page_and_refuses_what_is_not_a_workdir(smoke_run, tmp_path):
    bad = smoke_workdir.run_module("sdsup.demo", f"--workdir={tmp_path}", timeout=300)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1] == f"error: {tmp_path} is not a training workdir: it has no config.json"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    server = subprocess.Popen([sys.executable, "-m", "sdsup.demo", f"--workdir={smoke_run[0]}", "--port=0",
                               f"--out={tmp_path / 'out'}", "--nowarm_up"], cwd=smoke_workdir.ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = server.stdout.readline()
        url = re.search(r"open (http://127\.0\.0\.1:\d+/)", line).group(1)
        info = json.loads(urllib.request.urlopen(url + "api/info", timeout=60).read())
        assert info["classes"][0]["name"] == "sky" and info["capabilities"]["conditioner"]
        assert b'id="layout-canvas"' in urllib.request.urlopen(url, timeout=60).read()
    finally:
        server.terminate()
        server.wait(timeout=60)


# ------------------------------------------------------------------------------------------ the engine
@pytest.fixture(scope="module")
def engine(smoke_run, tmp_path_factory):
    return engine_lib.Engine(str(smoke_run[0]), str(tmp_path_factory.mktemp("demo_out")))


def test_a_workdir_without_layout_control_or_segmenter_says_so(smoke_run, tmp_path):
    workdir = smoke_workdir.copy_workdir(smoke_run[0], tmp_path / "wd")
    for stage in ("layout", "control", "evalseg"):
        (workdir / stage / "DONE.json").unlink()
    partial = engine_lib.Engine(str(workdir), str(tmp_path / "out"))
    info = partial.info()
    assert info["capabilities"] == {"layout": False, "conditioner": False, "segmenter": False}
    assert info["segmenter_real_miou"] is None  # metrics.json still has it, but there is no segmenter to trust
    assert [n.split(" (")[0] for n in info["notices"]] == ["stage layout", "stage control", "stage evalseg"]
    assert [name for name, _, _ in partial.warm_up_steps()] == ["image sampler (1 image, default settings)"]
    with pytest.raises(layouts.DemoError, match="no text -> layout model"):
        partial.layout(PROMPT)
    with pytest.raises(layouts.DemoError, match="no evaluation segmenter"):
        partial.segment_photo("p.png", _png(np.zeros((SIZE, SIZE, 3))))


def test_the_page_command_reproduces_its_images_and_layout(engine, smoke_run, tmp_path):
    """What the page makes, `python -m sdsup.sample` with the page's command makes too, pixel for pixel."""
    drawn = engine.layout(PROMPT, "sample", seed=2)
    ids = layouts.decode_ids(drawn["ids"], SIZE, SPEC)
    painted = ids.copy()
    painted[2:6, 20:30] = SPEC.class_names.index("sun")
    result = engine.generate(PROMPT, layouts.encode_ids(painted), seed=5, num_samples=2)
    folder = result["folder"]
    assert np.array_equal(np.load(os.path.join(folder, "layout.npy")), painted)
    assert result["layout_command"] is None  # edited: only the layout file says what conditioned the images
    assert len(result["results"]) == 2 and all(0 <= r["agreement"]["miou"] <= 1 for r in result["results"])
    flags = commands.parse_flags(result["command"])
    assert flags["layout"] == os.path.join(folder, "layout.npy") and flags["num_samples"] == "2"
    # The test's compilation cache: a warm one saves the command's sampler compile.
    cache = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir)
    reproduced = smoke_workdir.run_module("sdsup.sample", *_argv(flags), env=cache)
    assert reproduced.returncode == 0, reproduced.stderr[-2000:]
    for i in range(2):
        page = np.asarray(Image.open(os.path.join(folder, f"image_{i}.png")))
        assert np.array_equal(np.asarray(Image.open(os.path.join(flags["out"], f"image_{i}.png"))), page)
    # An unedited layout from the model comes with the command that draws it: its flags, given to the
    # Session call that sdsup.sample makes for them, draw the same map.
    unedited = engine.generate(PROMPT, drawn["ids"], seed=5, num_samples=2, layout_token=drawn["token"])
    layout_flags = commands.parse_flags(unedited["layout_command"])
    assert layout_flags["layout_only"] is True and layout_flags["seed"] == "2"
    again = engine.session.layouts(layout_flags["prompt"], 1, int(layout_flags["seed"]), layout_flags["layout_mode"],
                                   int(layout_flags["layout_steps"]), float(layout_flags["layout_temperature"]),
                                   float(layout_flags["layout_guidance"]))
    assert np.array_equal(again[0], ids)


# ------------------------------------------------------------------------------------------ the browser
@pytest.fixture
def page_engine(request):
    """The smoke workdir's engine, or with SDSUP_DEMO_WORKDIR=DIR (a scenes workdir) that one's: the browser
    test also makes the docs' screenshots of a real run (docs/demo.md)."""
    workdir = os.environ.get("SDSUP_DEMO_WORKDIR")
    if not workdir:
        return request.getfixturevalue("engine")
    return engine_lib.Engine(workdir, str(request.getfixturevalue("tmp_path") / "demo_out"))


@pytest.fixture
def browser(monkeypatch):
    if webdriver is None:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.skip("no Chromium for the browser test: install Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver); .ci/run does")
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never fetch a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1320,1500", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def _save(png: bytes, name: str, folder) -> None:
    (folder / name).write_bytes(png)
    extra = os.environ.get("SDSUP_DEMO_SCREENSHOTS")
    if extra:  # the copies for docs/demo/: 256 colours keep them small and the page's flat colours exact enough
        os.makedirs(extra, exist_ok=True)
        Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(os.path.join(extra, name), optimize=True)


def test_the_page_in_a_real_browser(browser, page_engine, tmp_path):
    engine, size = page_engine, page_engine.size
    server = server_lib.make_server(engine, "127.0.0.1", 0)
    server_lib.serve_in_thread(server)
    wait = WebDriverWait(browser, 120, poll_frequency=0.1)
    warm_up = engine.start_warm_up()
    try:
        browser.get(server.url)
        wait.until(lambda d: d.execute_script("return document.body.dataset.ready === 'yes'"))
        find = browser.find_element
        wait.until(lambda d: "Warm-up: layout sampler" in d.find_element(By.ID, "warmup").text)
        legend = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#class-picker .class-name")]
        assert legend == list(SPEC.class_names)

        find(By.ID, "btn-layout").click()  # no prompt yet: a message, not a request
        assert "the prompt is empty" in find(By.ID, "messages").text
        find(By.ID, "prompt").send_keys(PROMPT)
        find(By.ID, "layout-seed").clear()
        find(By.ID, "layout-seed").send_keys("2")
        find(By.ID, "btn-layout").click()
        wait.until(lambda d: "drawn by the layout model" in d.find_element(By.ID, "layout-origin").text)
        assert "--layout_only" in find(By.ID, "layout-command").text
        _save(find(By.ID, "step-prompt").screenshot_as_png, "demo_1_layout.png", tmp_path)

        house = SPEC.class_names.index("house")
        find(By.CSS_SELECTOR, f"#class-picker .class-item[data-id='{house}']").click()
        canvas = find(By.ID, "layout-canvas")
        cell = browser.execute_script("return arguments[0].clientWidth", canvas) / size

        def offset(x, y):  # layout pixel (x, y) -> offset from the canvas's centre, in CSS pixels
            return round((x + 0.5) * cell - size * cell / 2), round((y + 0.5) * cell - size * cell / 2)

        stroke = [(4 * size // SIZE, 20 * size // SIZE), (9 * size // SIZE, 22 * size // SIZE),
                  (14 * size // SIZE, 24 * size // SIZE)]
        chain = ActionChains(browser).move_to_element_with_offset(canvas, *offset(*stroke[0])).click_and_hold()
        for point in stroke[1:]:
            chain = chain.move_to_element_with_offset(canvas, *offset(*point))
        chain.release().perform()
        assert "edited" in find(By.ID, "layout-origin").text
        page_ids = np.asarray(browser.execute_script("return Array.from(window.sdsupDemo.ids)"), np.uint8)
        page_ids = page_ids.reshape(size, size)
        assert all(page_ids[y, x] == house for x, y in stroke)
        _save(find(By.ID, "step-prompt").screenshot_as_png, "demo_2_edited.png", tmp_path)

        find(By.ID, "num").clear()
        find(By.ID, "num").send_keys("2")
        find(By.ID, "btn-generate").click()
        wait.until(lambda d: d.find_element(By.ID, "timing").get_attribute("data-seconds"))
        images = browser.find_elements(By.CSS_SELECTOR, "#results img.image")
        assert len(images) == 2
        assert all(browser.execute_script("return arguments[0].naturalWidth", img) == size for img in images)
        assert len(browser.find_elements(By.CSS_SELECTOR, "#results img.reading")) == 2
        mious = [float(e.text) for e in browser.find_elements(By.CSS_SELECTOR, "#results .miou")]
        assert len(mious) == 2 and all(0 <= m <= 1 for m in mious)
        command = find(By.ID, "command").text
        flags = commands.parse_flags(command)
        assert flags["num_samples"] == "2" and flags["prompt"] == PROMPT
        sent = np.load(flags["layout"])  # the layout the page sent: exactly the painted map
        assert np.array_equal(sent, page_ids) and all(sent[y, x] == house for x, y in stroke)
        assert find(By.ID, "layout-command-box").get_attribute("hidden")  # edited: no layout command
        _save(find(By.ID, "step-generate").screenshot_as_png, "demo_3_images.png", tmp_path)
        page = browser.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        _save(base64.b64decode(page["data"]), "demo_page.png", tmp_path)

        # A layout file of the wrong size: resized, with a note; one with colours outside the palette: a message.
        find(By.ID, "upload-layout").send_keys(str(_write(tmp_path / "big.png", _png(np.repeat(np.repeat(
            layouts.palette_image(_example_label(size), SPEC), 2, 0), 2, 1)))))
        note = f"big.png is {2 * size}x{2 * size}: resized to {size}x{size}"
        wait.until(lambda d: note in d.find_element(By.ID, "messages").text)
        off = layouts.palette_image(_example_label(size), SPEC).copy()
        off[0, 0] = (1, 2, 3)
        find(By.ID, "upload-layout").send_keys(str(_write(tmp_path / "off.png", _png(off))))
        wait.until(lambda d: "is not in the scenes palette" in d.find_element(By.ID, "messages").text)
        # A photo (a test-split scene) through the evaluation segmenter becomes the layout.
        photo = scenes.make_example(0, "test", 3, size)["image"]
        find(By.ID, "upload-photo").send_keys(str(_write(tmp_path / "scene.png", _png(photo))))
        wait.until(lambda d: "segmenter's map of scene.png" in d.find_element(By.ID, "layout-origin").text)
    finally:
        server.shutdown()
        server.server_close()
        warm_up.join(timeout=600)  # its compiles must not run on into the next test file


def _write(path, data: bytes):
    path.write_bytes(data)
    return path
