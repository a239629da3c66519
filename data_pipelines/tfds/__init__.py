"""TFDS builders (array_record, no TensorFlow needed). Importing registers them with TFDS."""
from data_pipelines.tfds.common import FILE_FORMAT, bytes_feature, dataset_dir, load_source, prepare
from data_pipelines.tfds.image_folder import ImageFolder
from data_pipelines.tfds.preference_pairs import PreferencePairs, PreferencePairsConfig, shapes_pairs_config
from data_pipelines.tfds.shapes_bench import ShapesBench, ShapesBenchConfig, shapes_config
