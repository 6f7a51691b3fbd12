export { buildImage, baseKernelArgs, contentId } from './build.ts';
export { importImage, type ImportRequest } from './import.ts';
export { findRecipe, listRecipes, loadRecipeFile, parseRecipe, type Recipe } from './recipe.ts';
export { ImageStore, type Image, type ImageManifest } from './store.ts';
