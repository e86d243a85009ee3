"""Real datasets built from files the user already has: ADE20K, Cityscapes, COCO-Stuff and `folder` (your own).

Each is a tfds builder (`ade20k`, `cityscapes`, `coco_stuff`, `folder` modules) that reads the original
zips or their extracted folders from `data.path` and writes array_record, nothing downloaded. Every
record, whatever the dataset, holds:

  image     the original encoded file (JPEG or PNG bytes), unchanged: the input pipeline decodes,
            resizes and crops at read time (`pipeline.Geometry`), so one build serves every image size.
  label     PNG bytes (8-bit, one channel) of the label map already mapped to the dataset's class ids
            0..N-1, with 255 = ignore; same size as the image.
  captions  JSON list of every caption of the image (COCO's ~5; one for the others), never empty.
  caption   captions[0], for code that reads one caption (`caption_source="field:caption"`).
  id        the stem the image, label map and captions are paired by (`ADE_train_00000001`,
            `frankfurt_000000_000576`, `000000000139`, your file's stem).
  index     int64 position of the record in its split (splits are in stem order).

The dataset's class names, palette and ignore id are in its DatasetInfo metadata too.

Config keys (`data.*`), read by each module's `make_builder`:

  name              "ade20k" | "cityscapes" | "coco_stuff" | "folder"
  path              the folder holding the zips or extracted folders (for `folder`, the dataset root).
  data_dir          tfds data_dir (None: tfds' default).
  captions          ADE20K, Cityscapes, folder: a JSON file, or comma-separated files merged, of
                    {stem: "caption"} or {stem: ["caption", ...]} (ALDM's published caption files).
                    COCO-Stuff reads COCO's caption annotations instead unless this is set.
  missing_captions  "error" (default): an image without a caption stops the build, naming it;
                    "empty": it gets "".
  validation_fraction, seed
                    `folder` without split lists: the share of images held out, drawn with the seed.

A build is named by a hash of its sources and options (`common.config_name`), so other files or
options build a new dataset beside the old one instead of silently reusing it. Sources are checked
before tfds writes anything and every file is decoded while writing; bad input stops the build with
a `registry.DatasetError` naming the file, and tfds only moves a finished build into place, so a
failed build never touches an earlier one.

`classes` (class tables, palettes, raw-id tables, the colour -> id tie rule) and `classfile` (the
`folder` class file) need no TensorFlow and are what the registry imports; the builder modules import
tensorflow_datasets and are imported only to build or open a dataset.
"""
