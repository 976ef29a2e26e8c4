// Reads result objects with dcmjs the way OHIF's SEG loader does (dcmjs.adapters.Cornerstone.Segmentation
// .generateToolState over the source images' Cornerstone metadata), and parses SRs with dcmjs.
// Usage: node read_results.js request.json   (request: {"sources": [paths in slice order], "segs": [paths],
// "srs": [paths]}); prints one JSON object: per SEG what dcmjs parsed and, where its adapter reads the SEG, the
// voxel count of each segment on each source image; per SR its template and measurement groups.
"use strict";
const fs = require("fs");
const dcmjs = require("dcmjs");

const { DicomMessage, DicomMetaDictionary } = dcmjs.data;

function read(path) {
  const buffer = fs.readFileSync(path);
  const arrayBuffer = buffer.buffer.slice(buffer.byteOffset, buffer.byteOffset + buffer.byteLength);
  const message = DicomMessage.readFile(arrayBuffer);
  const dataset = DicomMetaDictionary.naturalizeDataset(message.dict);
  dataset._meta = DicomMetaDictionary.namifyDataset(message.meta);
  return { arrayBuffer, dataset };
}

function asArray(value) {
  return value === undefined ? [] : Array.isArray(value) ? value : [value];
}

// The Cornerstone metadata provider over the source images: the modules the SEG adapter asks for.
function metadataProvider(sources) {
  const byId = new Map(sources.map((ds, i) => [`source:${i}`, ds]));
  return {
    get(type, imageId) {
      const ds = byId.get(imageId);
      if (!ds) return undefined;
      const iop = ds.ImageOrientationPatient.map(Number);
      switch (type) {
        case "instance":
          return ds;
        case "imagePlaneModule":
          return {
            rowCosines: iop.slice(0, 3),
            columnCosines: iop.slice(3, 6),
            imagePositionPatient: ds.ImagePositionPatient.map(Number),
            rows: ds.Rows,
            columns: ds.Columns,
          };
        case "imagePixelModule":
          return { rows: ds.Rows, columns: ds.Columns };
        case "generalSeriesModule":
          return { seriesInstanceUID: ds.SeriesInstanceUID };
        default:
          return undefined;
      }
    },
  };
}

// A segment's type and anatomic region codes with their modifiers (laterality), as code values.
function segmentCodes(segment) {
  const type = asArray(segment && segment.SegmentedPropertyTypeCodeSequence)[0] || {};
  const region = asArray(segment && segment.AnatomicRegionSequence)[0] || {};
  const values = (sequence) => asArray(sequence).map((c) => c.CodeValue);
  return {
    type: type.CodeValue,
    typeModifiers: values(type.SegmentedPropertyTypeModifierCodeSequence),
    region: region.CodeValue,
    regionModifiers: values(region.AnatomicRegionModifierSequence),
  };
}

function readSeg(path, imageIds, provider, rows, columns) {
  const { arrayBuffer, dataset } = read(path);
  const out = {
    path,
    sopClassUID: dataset.SOPClassUID,
    segmentationType: dataset.SegmentationType,
    frames: Number(dataset.NumberOfFrames),
    segmentLabels: asArray(dataset.SegmentSequence).map((s) => s.SegmentLabel),
    segmentCodes: asArray(dataset.SegmentSequence).map(segmentCodes),
    normalized: false,
  };
  try {
    const multiframe = dcmjs.normalizers.Normalizer.normalizeToDataset([dataset]);
    out.normalized = multiframe !== undefined;
    out.referencedInstances = asArray(multiframe.PerFrameFunctionalGroupsSequence).map(
      (f) => asArray(asArray(f.DerivationImageSequence)[0].SourceImageSequence)[0].ReferencedSOPInstanceUID,
    );
  } catch (error) {
    out.normalizeError = String(error && error.message ? error.message : error);
  }
  try {
    const state = dcmjs.adapters.Cornerstone.Segmentation.generateToolState(imageIds, arrayBuffer, provider);
    if (!state) throw new Error("the adapter returned nothing");
    const labelmap = new Uint16Array(state.labelmapBufferArray[0]);
    const slice = rows * columns;
    const counts = {};
    for (let z = 0; z < imageIds.length; ++z) {
      for (let j = z * slice; j < (z + 1) * slice; ++j) {
        const s = labelmap[j];
        if (s) {
          counts[s] = counts[s] || new Array(imageIds.length).fill(0);
          counts[s][z] += 1;
        }
      }
    }
    out.toolState = {
      counts,
      segments: Object.keys(state.segMetadata.data).length - 1,
      // the segment metadata the adapter hands the viewer
      segmentCodes: state.segMetadata.data.filter(Boolean).map(segmentCodes),
    };
  } catch (error) {
    out.toolStateError = String(error && error.message ? error.message : error);
  }
  return out;
}

function readSr(path) {
  const { dataset } = read(path);
  const template = asArray(dataset.ContentTemplateSequence)[0] || {};
  const containers = asArray(dataset.ContentSequence).filter((item) => item.ValueType === "CONTAINER");
  const groups = containers.flatMap((c) => asArray(c.ContentSequence).filter((item) => item.ValueType === "CONTAINER"));
  return {
    path,
    sopClassUID: dataset.SOPClassUID,
    template: template.TemplateIdentifier,
    title: asArray(dataset.ConceptNameCodeSequence)[0].CodeMeaning,
    measurementGroups: groups.length,
  };
}

function main() {
  const request = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
  const sources = request.sources.map((p) => read(p).dataset);
  const imageIds = sources.map((_, i) => `source:${i}`);
  const provider = metadataProvider(sources);
  const { Rows: rows, Columns: columns } = sources[0];
  const result = {
    dcmjs: JSON.parse(fs.readFileSync(require.resolve("dcmjs").replace(/build\/.*$/, "package.json"), "utf8")).version,
    segs: (request.segs || []).map((p) => readSeg(p, imageIds, provider, rows, columns)),
    srs: (request.srs || []).map(readSr),
  };
  process.stdout.write(JSON.stringify(result));
}

main();
